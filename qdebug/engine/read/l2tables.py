"""Reading L2 tables in bulk: which tables the active L1 maps, and their entries as numpy copies.

Entries are read with preadv into arrays, not through the mmap: first touches of mapped pages
cost a page fault each (a third of a whole-image scan), and on a cold page cache the kernel gives
up read-ahead on an mmap scan. `readahead` announces the tables first (POSIX_FADV_WILLNEED), so a
cold scan is not one synchronous small read after another. Two shapes serve the readers: dense
entries of a guest cluster range (`gather_l2`, block status) and sparse batches of whole tables
(`iter_l2_batches`, per-cluster listings and counts).
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from ..errors import CorruptImage
from ..file.image import Image
from ..format import constants as C

BATCH_TABLES = 64  # L2 tables per sparse batch (at most 4 MiB of entries with 64 KiB clusters)


def readahead(f, offsets: Iterable[int], length: int) -> None:
    """Ask the kernel to read [off, off+length) of `f` (anything with an `fd`) ahead, per offset."""
    for off in offsets:
        try:
            os.posix_fadvise(f.fd, int(off), length, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            return


def l2_table_offsets(img: Image) -> np.ndarray:
    """(l1_index, l2_offset) pairs of the active L1 entries that point at an L2 table."""
    l1 = np.asarray(img.l1, dtype=np.uint64)
    offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    idx = np.flatnonzero(offs)
    return np.stack([idx, offs[idx]], axis=1) if len(idx) else np.zeros((0, 2), dtype=np.int64)


def read_l2_entries(img: Image, l1_index: int, l2_off: int, first: int, count: int) -> np.ndarray:
    """Entries first..first+count of the L2 table at `l2_off`, as a (count, words) big-endian
    copy; a table that is unaligned or cut off by the end of the file raises the CorruptImage
    that names it."""
    words = 2 if img.header.extended_l2 else 1
    raw = np.empty((count, words), dtype=">u8")
    done = -1
    if not l2_off % img.header.cluster_size:
        try:
            done = os.preadv(img.fd, [raw], l2_off + first * 8 * words)
        except OSError:
            done = -1
    if done != raw.nbytes:
        img.l2_table(l2_off, l1_index)  # raises the CorruptImage that names the table
        raise CorruptImage(f"L2 table (L1 index {l1_index}) at 0x{l2_off:x} could not be read whole")
    return raw


def gather_l2(img: Image, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(word0, bitmap) of guest clusters [c0, c1) as native copies; zeros (UNALLOCATED_PLAIN) where
    the L1 has no table. bitmap is None for standard L2 entries."""
    h = img.header
    per = h.l2_entries
    n = c1 - c0
    w0 = np.zeros(n, dtype=np.uint64)
    bm = np.zeros(n, dtype=np.uint64) if h.extended_l2 else None
    for l1_index in range(c0 // per, (c1 - 1) // per + 1):
        l2_off = img.l2_offset(l1_index)
        if not l2_off:
            continue
        a, b = max(c0, l1_index * per), min(c1, (l1_index + 1) * per)
        raw = read_l2_entries(img, l1_index, l2_off, a - l1_index * per, b - a)
        w0[a - c0:b - c0] = raw[:, 0]
        if bm is not None:
            bm[a - c0:b - c0] = raw[:, 1]
    return w0, bm


def tables_of(img: Image, c0: int, c1: int) -> list[int]:
    """Offsets of the L2 tables that map guest clusters [c0, c1)."""
    per = img.header.l2_entries
    return [off for i in range(c0 // per, (c1 - 1) // per + 1) if (off := img.l2_offset(i))]


def iter_l2_batches(img: Image, tables: np.ndarray | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield (guest cluster indices, word0, bitmap) for batches of the L2 tables the L1 maps
    (or `tables`), limited to the guest clusters inside the virtual size. Tables past the end of
    the file are skipped (the checker reports them)."""
    h = img.header
    per = h.l2_entries
    nclusters = h.guest_clusters
    tables = l2_table_offsets(img) if tables is None else tables
    if len(tables):
        tables = tables[(tables[:, 1] + h.cluster_size <= img.file_size) & (tables[:, 0] * per < nclusters)]
    readahead(img, tables[:BATCH_TABLES * 4, 1].tolist() if len(tables) else (), h.cluster_size)
    for b in range(0, len(tables), BATCH_TABLES):
        readahead(img, tables[b + BATCH_TABLES * 4:b + BATCH_TABLES * 5, 1].tolist(), h.cluster_size)
        w0s, bms, gcs = [], [], []
        for l1_index, l2_off in tables[b:b + BATCH_TABLES].tolist():
            n = min(per, nclusters - l1_index * per)
            raw = read_l2_entries(img, l1_index, l2_off, 0, n)
            w0s.append(raw[:, 0])
            if h.extended_l2:
                bms.append(raw[:, 1])
            gcs.append(np.arange(l1_index * per, l1_index * per + n, dtype=np.int64))
        yield (np.concatenate(gcs), np.concatenate(w0s).astype(np.uint64),
               np.concatenate(bms).astype(np.uint64) if bms else None)
