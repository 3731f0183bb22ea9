"""Block status: what each guest byte range is in each layer, and which layer answers for it.

`layer_runs` turns one layer's metadata into sorted runs (start, end, kind, host) with numpy: a
cluster whose 32 subclusters share one type is one unit, only mixed clusters are expanded to
subclusters, so a 1 TiB image costs per L2 entry, not per subcluster. `resolve` stacks the runs of
every layer the way QEMU's block layer does (top first; unallocated ranges fall through to the
backing file; past a shorter backing file they read as zeros) and is shared by guest reads,
`map` and the TUI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import constants as C
from .subclusters import SubclusterType as T, cluster_flags, classify

# Raw-file kinds, numbered after QEMU's subcluster types.
RAW_DATA = 7
RAW_HOLE = 8

_U64 = np.uint64
_FULL = _U64(0xFFFFFFFF)
# Kinds whose host offset is meaningful and contiguous within a run.
_HOST_KINDS = np.array([k in (T.NORMAL, T.ZERO_ALLOC, T.UNALLOCATED_ALLOC, RAW_DATA, RAW_HOLE)
                        for k in range(10)])
# Kinds that answer for the range (QEMU: BDRV_BLOCK_DATA or BDRV_BLOCK_ZERO from the driver).
DECISIVE = np.array([k in (T.ZERO_PLAIN, T.ZERO_ALLOC, T.NORMAL, T.COMPRESSED, T.INVALID, RAW_DATA, RAW_HOLE)
                     for k in range(10)])
IS_DATA = np.array([k in (T.NORMAL, T.COMPRESSED, RAW_DATA) for k in range(10)])
IS_ZERO = np.array([k in (T.ZERO_PLAIN, T.ZERO_ALLOC, RAW_HOLE) for k in range(10)])


@dataclass
class Runs:
    """Sorted, gap-free runs covering [start[0], end[-1]). host is -1 where no offset applies;
    for COMPRESSED it holds the L2 descriptor (word 0)."""

    start: np.ndarray
    end: np.ndarray
    kind: np.ndarray
    host: np.ndarray

    @staticmethod
    def empty() -> "Runs":
        z = np.zeros(0, dtype=np.int64)
        return Runs(z, z.copy(), np.zeros(0, dtype=np.uint8), z.copy())

    @staticmethod
    def concat(parts: list["Runs"]) -> "Runs":
        if not parts:
            return Runs.empty()
        if len(parts) == 1:
            return parts[0]
        return Runs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("start", "end", "kind", "host")))


def cluster_units(word0: np.ndarray, bitmap: np.ndarray | None, first_cluster: int, cluster_size: int,
                  *, extended: bool) -> Runs:
    """Units (cluster, or subcluster for mixed clusters) of a slice of L2 entries."""
    w0 = np.asarray(word0, dtype=np.uint64)
    n = len(w0)
    compressed, allocated, invalid = cluster_flags(w0, bitmap, extended=extended)
    off = (w0 & _U64(C.L2E_OFFSET_MASK)).astype(np.int64)
    if not extended or bitmap is None:
        utype = classify(w0, None, extended=False)[:, 0]
        mixed = np.zeros(n, dtype=bool)
    else:
        bm = np.asarray(bitmap, dtype=np.uint64)
        a = bm & _FULL
        z = bm >> _U64(32)
        utype = np.full(n, 255, dtype=np.uint8)
        utype[allocated & (a == 0) & (z == 0)] = T.UNALLOCATED_ALLOC
        utype[allocated & (a == _FULL)] = T.NORMAL
        utype[allocated & (z == _FULL)] = T.ZERO_ALLOC
        utype[~allocated & (z == 0)] = T.UNALLOCATED_PLAIN
        utype[~allocated & (z == _FULL)] = T.ZERO_PLAIN
        utype[compressed] = T.COMPRESSED
        utype[invalid] = T.INVALID
        mixed = utype == 255
    cstart = (np.arange(n, dtype=np.int64) + first_cluster) * cluster_size
    if not mixed.any():
        host = np.where(_HOST_KINDS[utype], off, -1)
        host = np.where(utype == T.COMPRESSED, w0.astype(np.int64), host)
        return Runs(cstart, cstart + cluster_size, utype, host)
    scs = cluster_size // 32
    counts = np.where(mixed, 32, 1)
    idx = np.repeat(np.arange(n), counts)
    within = np.arange(len(idx)) - np.repeat(np.cumsum(counts) - counts, counts)
    kind = utype[idx].copy()
    mrows = np.flatnonzero(mixed)
    kind[mixed[idx]] = classify(w0[mrows], np.asarray(bitmap)[mrows], extended=True).reshape(-1)
    start = cstart[idx] + within * scs
    length = np.where(mixed[idx], scs, cluster_size)
    host = np.where(_HOST_KINDS[kind], off[idx] + within * scs, -1)
    host = np.where(kind == T.COMPRESSED, w0.astype(np.int64)[idx], host)
    return Runs(start, start + length, kind, host)


def coalesce(r: Runs) -> Runs:
    """Merge neighbouring units of one kind (host-contiguous where a host applies); compressed and
    invalid clusters stay one run each so errors and decompression can name their cluster."""
    if len(r.start) <= 1:
        return r
    same = r.kind[1:] == r.kind[:-1]
    hk = _HOST_KINDS[r.kind[1:]]
    contiguous = np.where(hk, r.host[1:] == r.host[:-1] + (r.end[:-1] - r.start[:-1]), True)
    single = (r.kind[1:] == T.COMPRESSED) | (r.kind[1:] == T.INVALID)
    brk = ~(same & contiguous & ~single)
    heads = np.concatenate([[0], np.flatnonzero(brk) + 1])
    ends = np.concatenate([heads[1:] - 1, [len(r.start) - 1]])
    return Runs(r.start[heads], r.end[ends], r.kind[heads], r.host[heads])


def clip(r: Runs, start: int, end: int) -> Runs:
    """Restrict runs to [start, end), adjusting host offsets of host kinds."""
    if len(r.start) == 0:
        return r
    keep = (r.end > start) & (r.start < end)
    s, e, k, h = r.start[keep], r.end[keep], r.kind[keep], r.host[keep]
    if len(s) == 0:
        return Runs.empty()
    delta = np.maximum(start - s, 0)
    h = np.where(_HOST_KINDS[k], h + delta, h)
    s = np.maximum(s, start)
    e = np.minimum(e, end)
    return Runs(s, e, k, h)


def qcow2_runs(img, start: int, end: int) -> Runs:
    """Runs of a qcow2 layer over guest [start, end) (end already clamped to the layer's size)."""
    if start >= end:
        return Runs.empty()
    h = img.header
    cs = h.cluster_size
    per_l2 = h.l2_entries
    c0, c1 = start // cs, (end + cs - 1) // cs
    parts: list[Runs] = []
    l1_first, l1_last = c0 // per_l2, (c1 - 1) // per_l2
    for l1_index in range(l1_first, l1_last + 1):
        a = max(c0, l1_index * per_l2)
        b = min(c1, (l1_index + 1) * per_l2)
        l2_off = img.l2_offset(l1_index)
        if not l2_off:
            s = a * cs
            parts.append(Runs(np.array([s]), np.array([b * cs]), np.array([T.UNALLOCATED_PLAIN], np.uint8),
                              np.array([-1])))
            continue
        w0, bm = img.l2_table(l2_off, l1_index)
        i0, i1 = a - l1_index * per_l2, b - l1_index * per_l2
        parts.append(coalesce(cluster_units(w0[i0:i1], None if bm is None else bm[i0:i1], a, cs,
                                            extended=h.extended_l2)))
    return clip(coalesce(Runs.concat(parts)), start, end)


def raw_runs(raw, start: int, end: int, *, seek_holes: bool) -> Runs:
    """Runs of a raw file; with seek_holes, holes are told apart with SEEK_DATA/SEEK_HOLE as QEMU's
    file-posix driver does for block status."""
    if start >= end:
        return Runs.empty()
    if not seek_holes:
        return Runs(np.array([start]), np.array([end]), np.array([RAW_DATA], np.uint8), np.array([start]))
    starts, ends, kinds = [], [], []
    pos = start
    while pos < end:
        try:
            data = os.lseek(raw.fd, pos, os.SEEK_DATA)
        except OSError:
            data = end  # ENXIO: trailing hole
        if data > pos:
            nxt = min(data, end)
            starts.append(pos), ends.append(nxt), kinds.append(RAW_HOLE)
            pos = nxt
            continue
        try:
            hole = os.lseek(raw.fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        nxt = min(max(hole, pos + 1), end)
        starts.append(pos), ends.append(nxt), kinds.append(RAW_DATA)
        pos = nxt
    s = np.array(starts, dtype=np.int64)
    return Runs(s, np.array(ends, dtype=np.int64), np.array(kinds, dtype=np.uint8), s.copy())


def layer_runs(layer, start: int, end: int, *, seek_holes: bool = False) -> Runs:
    end = min(end, layer.size)
    if getattr(layer, "format", "qcow2") == "raw":
        return raw_runs(layer, start, end, seek_holes=seek_holes)
    return qcow2_runs(layer, start, end)


@dataclass
class Resolved:
    """Pieces of a guest range with the layer that answers for each (QEMU's depth)."""

    start: np.ndarray
    end: np.ndarray
    depth: np.ndarray
    kind: np.ndarray  # kind in the answering layer; unallocated kinds read as zeros
    host: np.ndarray

    def __len__(self) -> int:
        return len(self.start)


def resolve(runs: list[Runs], sizes: list[int], start: int, end: int) -> Resolved:
    """Stack per-layer runs (top first) into pieces, each answered by its first decisive layer."""
    bounds = [np.array([start, end], dtype=np.int64)]
    for i, r in enumerate(runs):
        bounds.append(r.start)
        bounds.append(r.end)
        if start < sizes[i] < end:
            bounds.append(np.array([sizes[i]], dtype=np.int64))
    cuts = np.unique(np.concatenate(bounds))
    cuts = cuts[(cuts >= start) & (cuts <= end)]
    ps, pe = cuts[:-1], cuts[1:]
    n = len(ps)
    depth = np.zeros(n, dtype=np.int64)
    kind = np.full(n, T.UNALLOCATED_PLAIN, dtype=np.uint8)
    host = np.full(n, -1, dtype=np.int64)
    pending = np.ones(n, dtype=bool)
    for d, r in enumerate(runs):
        if not pending.any():
            break
        inside = pending & (ps < sizes[d])
        # Past this layer's end the range reads as zeros, answered (unallocated) by the layer above.
        pending &= inside
        if len(r.start) == 0:
            continue
        j = np.clip(np.searchsorted(r.start, ps, side="right") - 1, 0, len(r.start) - 1)
        k = r.kind[j]
        hst = np.where(_HOST_KINDS[k], r.host[j] + (ps - r.start[j]), r.host[j])
        sel = pending & inside
        depth[sel] = d
        kind[sel] = k[sel]
        host[sel] = hst[sel]
        pending &= ~DECISIVE[k]
        if d == len(runs) - 1:
            pending[:] = False
    return Resolved(ps, pe, depth, kind, host)
