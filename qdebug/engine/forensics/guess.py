"""What an unreferenced cluster's content looks like: a guess, shown as one.

Tests run on whole clusters at once (rows of a batch), strictest first:
* zeros: proves nothing (an empty L2 table, a freed cluster, a zero-filled guest cluster alike);
* an L2 table: every non-zero entry could have been written by QEMU (reserved bits clear, host
  offsets aligned and inside the file, no host cluster twice, a valid subcluster bitmap;
  compressed descriptors inside the file with a zero bitmap);
* an L1 table: every non-zero word is an aligned in-file offset with at most the COPIED flag
  (with extended L2 also in the odd words, which in an L2 table hold bitmaps; a standard-L2 L1
  table cannot be told from an L2 table whose entries carry no flags, and is called an L2 table);
* a refcount block: small counters (at most 64) at the image's refcount width; for widths below
  8 bits, counters that stop well before the end of the block (blocks are filled from the front);
* guest data: anything else.
A cluster that `bundle` emptied carries a marker and is reported as the guest data it held.
"""

from __future__ import annotations

import os
from enum import IntEnum

import numpy as np

from ..format import constants as C
from .source import ImageFile

_U64 = np.uint64
BUNDLE_MARKER = b"qdebug bundle: guest data removed\n"  # first bytes of a cluster `bundle` emptied


class Guess(IntEnum):
    NONE = 0  # not looked at (referenced clusters, or past the end of the file)
    ZEROS = 1
    L1_TABLE = 2
    L2_TABLE = 3
    REFCOUNT_BLOCK = 4
    DATA = 5


GUESS_NAMES = ("", "zeros", "l1-table", "l2-table", "refcount-block", "data")
MAX_SMALL_REFCOUNT = 64
_GUESS_BATCH_BYTES = 8 << 20


def guess_rows(rows: np.ndarray, *, extended: bool, cluster_bits: int, file_size: int,
               refcount_order: int) -> np.ndarray:
    """Guess per row of `rows` ((k, cluster_size) uint8, file bytes): a uint8 Guess array."""
    k = rows.shape[0]
    out = np.full(k, Guess.DATA, dtype=np.uint8)
    if k == 0:
        return out
    words = rows.view(">u8").astype(np.uint64)  # native copy, (k, cs/8)
    nz = words != 0
    zero = ~nz.any(axis=1)
    out[zero] = Guess.ZEROS
    marker = np.frombuffer(BUNDLE_MARKER, dtype=np.uint8)
    removed = (rows[:, :len(marker)] == marker).all(axis=1)
    rest = ~zero & ~removed
    if rest.any():
        sel = np.flatnonzero(rest)
        w = words[sel]
        l2 = _looks_l2(w, extended, cluster_bits, file_size)
        l1 = ~l2 & _looks_l1(w, extended, cluster_bits, file_size)
        rb = ~l2 & ~l1 & _looks_refblock(rows[sel], w, refcount_order)
        out[sel[l2]] = Guess.L2_TABLE
        out[sel[l1]] = Guess.L1_TABLE
        out[sel[rb]] = Guess.REFCOUNT_BLOCK
    return out


def _looks_l1(w: np.ndarray, extended: bool, cluster_bits: int, file_size: int) -> np.ndarray:
    cs = 1 << cluster_bits
    off = w & _U64(C.L1E_OFFSET_MASK)
    ok = (w == 0) | (((w & ~_U64(C.L1E_OFFSET_MASK | C.QCOW_OFLAG_COPIED)) == 0) & (off != 0)
                     & ((off & _U64(cs - 1)) == 0) & (off < _U64(file_size)))
    good = ok.all(axis=1)
    if extended:  # odd words are bitmaps in an L2 table: an L1 table has entries there too
        good &= (w[:, 1::2] != 0).any(axis=1)
    return good


def _looks_l2(w: np.ndarray, extended: bool, cluster_bits: int, file_size: int) -> np.ndarray:
    cs = 1 << cluster_bits
    w0 = w[:, 0::2] if extended else w
    comp = (w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) != 0
    off = w0 & _U64(C.L2E_OFFSET_MASK)
    x = 62 - (cluster_bits - 8)
    coff = w0 & _U64((1 << x) - 1)
    plain_ok = (((w0 & _U64(C.L2E_STD_RESERVED_MASK)) == 0) & ((off & _U64(cs - 1)) == 0)
                & (off < _U64(file_size)))
    comp_ok = ((w0 & _U64(C.QCOW_OFLAG_COPIED)) == 0) & (coff < _U64(file_size))
    if extended:
        bm = w[:, 1::2]
        a, z = bm & _U64(0xFFFFFFFF), bm >> _U64(32)
        plain_ok &= np.where(off != 0, (a & z) == 0, a == 0)
        comp_ok &= bm == 0
        used = (w0 != 0) | (bm != 0)
    else:
        used = w0 != 0
    ok = np.where(comp, comp_ok, plain_ok) | ~used
    good = ok.all(axis=1) & used.any(axis=1)
    if good.any():  # no host cluster mapped twice in one table
        cl = np.where(comp | (off == 0), _U64(0), off)
        s = np.sort(cl[good], axis=1)
        dup = ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] != 0)).any(axis=1)
        idx = np.flatnonzero(good)
        good[idx[dup]] = False
    return good


def _looks_refblock(rows: np.ndarray, w: np.ndarray, order: int) -> np.ndarray:
    if order > C.MAX_REFCOUNT_ORDER:
        return np.zeros(len(rows), dtype=bool)
    if order >= 3:
        dt = {3: np.dtype("u1"), 4: np.dtype(">u2"), 5: np.dtype(">u4"), 6: np.dtype(">u8")}[order]
        vals = rows.view(dt)
        return (vals <= MAX_SMALL_REFCOUNT).all(axis=1)
    # packed 1/2/4-bit counters carry no magnitude: require the block to end in zeros (a block is
    # filled from its first cluster on, and the last one of an image is never full)
    nzb = rows != 0
    last = rows.shape[1] - 1 - np.argmax(nzb[:, ::-1], axis=1)
    return last < rows.shape[1] * 7 // 8


def with_data(fd: int, clusters: np.ndarray, cs: int) -> np.ndarray:
    """The clusters (sorted indices) that are not wholly a hole in the file: per run of consecutive
    clusters one SEEK_DATA / SEEK_HOLE pair, so holes cost nothing to guess."""
    if clusters.size == 0:
        return clusters
    brk = np.flatnonzero(np.diff(clusters) != 1) + 1
    keep = np.zeros(clusters.size, dtype=bool)
    for a, b in zip(np.r_[0, brk].tolist(), np.r_[brk, clusters.size].tolist()):
        pos, end = int(clusters[a]) * cs, (int(clusters[b - 1]) + 1) * cs
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            if start >= end:
                break
            try:
                stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            except OSError:
                stop = end
            lo, hi = start // cs - int(clusters[a]), -(-stop // cs) - int(clusters[a])
            keep[a + lo:a + hi] = True
            pos = max(stop, start + 1)
    return clusters[keep]


def guess_clusters(f: ImageFile, clusters: np.ndarray) -> np.ndarray:
    """Content guesses of host clusters `clusters` (sorted, inside the file): uint8 Guess array."""
    fl, cs = f.header, f.cluster_size
    out = np.zeros(len(clusters), dtype=np.uint8)
    per = max(1, _GUESS_BATCH_BYTES // cs)
    buf = np.empty((min(per, len(clusters)) or 1, cs), dtype=np.uint8)
    for b in range(0, len(clusters), per):
        sel = clusters[b:b + per]
        rows = buf[:len(sel)]
        # consecutive clusters in one read
        brk = np.flatnonzero(np.diff(sel) != 1) + 1
        for s, e in zip(np.r_[0, brk].tolist(), np.r_[brk, len(sel)].tolist()):
            f.read_into(rows[s:e], int(sel[s]) * cs)
        out[b:b + len(sel)] = guess_rows(rows, extended=fl.extended_l2, cluster_bits=fl.cluster_bits,
                                         file_size=f.file_size, refcount_order=fl.refcount_order)
    return out
