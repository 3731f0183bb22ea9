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
import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import QcowError
from ..format import constants as C
from ..format.subclusters import SubclusterType as T
from .kinds import NKINDS, NORMAL_HOLE, RAW_DATA, RAW_HOLE
from .l2tables import gather_l2, readahead, tables_of

_U64 = np.uint64
_FULL = _U64(0xFFFFFFFF)
# Kinds whose host offset is meaningful and contiguous within a run.
_HOST_KINDS = np.array([k in (T.NORMAL, T.ZERO_ALLOC, T.UNALLOCATED_ALLOC, RAW_DATA, RAW_HOLE, NORMAL_HOLE)
                        for k in range(NKINDS)])
# Kinds that answer for the range (QEMU: BDRV_BLOCK_DATA or BDRV_BLOCK_ZERO from the driver).
DECISIVE = np.array([k in (T.ZERO_PLAIN, T.ZERO_ALLOC, T.NORMAL, T.COMPRESSED, T.INVALID, RAW_DATA, RAW_HOLE,
                          NORMAL_HOLE) for k in range(NKINDS)])
IS_DATA = np.array([k in (T.NORMAL, T.COMPRESSED, RAW_DATA, NORMAL_HOLE) for k in range(NKINDS)])
IS_ZERO = np.array([k in (T.ZERO_PLAIN, T.ZERO_ALLOC, RAW_HOLE, NORMAL_HOLE) for k in range(NKINDS)])


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


def _kind_lut() -> np.ndarray:
    """Subcluster type by code = invalid<<4 | compressed<<3 | allocated<<2 | alloc bit<<1 | zero bit."""
    lut = np.zeros(32, dtype=np.uint8)
    for code in range(32):
        al, a, z = code >> 2 & 1, code >> 1 & 1, code & 1
        lut[code] = (T.INVALID if code & 16 else T.COMPRESSED if code & 8
                     else (T.ZERO_ALLOC if al else T.ZERO_PLAIN) if z
                     else T.NORMAL if a else T.UNALLOCATED_ALLOC if al else T.UNALLOCATED_PLAIN)
    return lut


_KIND_LUT = _kind_lut()


def cluster_units(word0: np.ndarray, bitmap: np.ndarray | None, first_cluster: int, cluster_size: int,
                  *, extended: bool, clusters: np.ndarray | None = None, data_file: bool = False) -> Runs:
    """Runs of one type inside each cluster of a slice of L2 entries (a uniform cluster is one run).

    A subcluster type changes where the alloc or zero bit changes, so the run heads of a cluster are
    the set bits of (A ^ A<<1) | (Z ^ Z<<1): only those are expanded, never all 32 subclusters.
    Types come from one lookup table indexed by a small code per run (fewer numpy passes).
    `clusters` gives each entry's guest cluster when the entries are not consecutive from
    `first_cluster`. `data_file`: the image keeps its data in an external data file (below)."""
    w0 = np.asarray(word0, dtype=np.uint64)
    n = len(w0)
    off = (w0 & _U64(C.L2E_OFFSET_MASK)).view(np.int64)
    comp = (w0 >> _U64(62)).astype(np.uint8) & 1
    al = (off != 0).view(np.uint8) & (comp ^ 1)
    if clusters is None:
        cstart = np.arange(first_cluster * cluster_size, (first_cluster + n) * cluster_size, cluster_size,
                           dtype=np.int64)
    else:
        cstart = np.asarray(clusters, dtype=np.int64) * cluster_size
    # QEMU's reads fail on an allocated cluster whose host offset is not cluster aligned, whatever
    # its subclusters say ("Cluster allocation offset ... unaligned"): such a cluster reads as INVALID
    misaligned = (al != 0) & ((off & (cluster_size - 1)) != 0)
    if data_file:
        # QEMU 7.2 with an external data file: offset 0 is a valid place there, so an entry with
        # offset 0 and COPIED is allocated (qcow2_get_cluster_type); a host offset other than the
        # guest offset, and any compressed entry, fail the read (qcow2_get_host_offset): INVALID.
        al = ((off != 0).view(np.uint8) | (w0 >> _U64(63)).astype(np.uint8)) & (comp ^ 1)
        misaligned = ((al != 0) & (off != cstart)) | (comp != 0)
        comp = np.zeros_like(comp)
    if not extended or bitmap is None:
        # standard L2: the v3 zero flag plays the zero bit, "allocated" the alloc bit
        code = (comp << 3) | (al * 6) | (w0 & _U64(1)).astype(np.uint8) | (misaligned.view(np.uint8) << 4)
        kind = _KIND_LUT[code]
        host = np.where(_HOST_KINDS[kind], off, -1)
        host = np.where(comp.view(bool), w0.view(np.int64), host)
        return Runs(cstart, cstart + cluster_size, kind, host)
    bm = np.asarray(bitmap, dtype=np.uint64)
    a = bm & _FULL
    z = bm >> _U64(32)
    # INVALID: alloc and zero bit together in an allocated cluster, any alloc bit in an unallocated one
    bad = ((a & (z | (al.astype(np.uint64) - _U64(1)))) != 0) | misaligned
    special = (comp << 3) | ((bad.view(np.uint8) & (comp ^ 1)) << 4)
    heads = ((a ^ (a << _U64(1))) | (z ^ (z << _U64(1)))) & _U64(0xFFFFFFFE)
    heads[special != 0] = 0
    nruns = np.bitwise_count(heads)
    if not nruns.any():  # every cluster uniform: one run each, typed by subcluster 0
        code = special | (al << 2) | ((a & _U64(1)).astype(np.uint8) << 1) | (z & _U64(1)).astype(np.uint8)
        kind = _KIND_LUT[code]
        host = np.where(_HOST_KINDS[kind], off, -1)
        host = np.where(comp.view(bool), w0.view(np.int64), host)
        return Runs(cstart, cstart + cluster_size, kind, host)
    nruns = nruns.astype(np.int64) + 1
    total = int(nruns.sum())
    idx = np.repeat(np.arange(n), nruns)
    mixed = nruns > 1
    bits = np.unpackbits(heads[mixed].astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    bits[:, 0] = 1
    sc = np.zeros(total, dtype=np.int64)
    sc[mixed[idx]] = np.nonzero(bits)[1]
    sc_end = np.append(sc[1:], 32)
    sc_end[np.cumsum(nruns) - 1] = 32
    scu = sc.view(np.uint64)
    code = (special[idx] | (al[idx] << 2) | (((a[idx] >> scu) & _U64(1)).astype(np.uint8) << 1)
            | ((z[idx] >> scu) & _U64(1)).astype(np.uint8))
    kind = _KIND_LUT[code]
    scs = cluster_size // 32
    base = cstart[idx]
    start = base + sc * scs
    host = np.where(_HOST_KINDS[kind], off[idx] + sc * scs, -1)
    host = np.where(comp[idx].view(bool), w0.view(np.int64)[idx], host)
    return Runs(start, base + sc_end * scs, kind, host)


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


# L2 entries per numpy pass. Smaller passes keep temporaries under glibc's 128 KiB mmap threshold
# (bigger ones are mmapped and page-faulted afresh each time, 3-7x slower per element); bigger
# passes pay the ~40 numpy calls of a pass less often. CPU time of `map` on 1 TiB images was lowest
# around 32k entries; it also bounds memory (at most 32 runs per entry).
SCAN_ENTRIES = 1 << 15


def qcow2_runs(img, start: int, end: int) -> Runs:
    """Runs of a qcow2 layer over guest [start, end) (end already clamped to the layer's size)."""
    if start >= end:
        return Runs.empty()
    h = img.header
    cs = h.cluster_size
    c0, c1 = start // cs, (end + cs - 1) // cs
    if c1 - c0 > SCAN_ENTRIES and not _has_tables(img, c0, c1):
        # HX: empty guest space costs O(1) however huge (keep this: tests/hostile/test_regressions.py)
        return Runs(np.array([start]), np.array([end]), np.array([T.UNALLOCATED_PLAIN], np.uint8), np.array([-1]))
    if c1 - c0 > SCAN_ENTRIES:
        readahead(img, tables_of(img, c0, c1), cs)
    parts: list[Runs] = []
    for b0 in range(c0, c1, SCAN_ENTRIES):
        b1 = min(c1, b0 + SCAN_ENTRIES)
        w0, bm = gather_l2(img, b0, b1)
        parts.append(coalesce(l2_runs(w0, bm, b0, b1, cs, h.extended_l2, h.has_data_file)))
    runs = parts[0] if len(parts) == 1 else coalesce(Runs.concat(parts))
    return clip(runs, start, end)


_ZERO_HALF = _U64(0xFFFFFFFF00000000)
_COMP_BIT = _U64(C.QCOW_OFLAG_COMPRESSED)


def l2_runs(w0: np.ndarray, bm: np.ndarray | None, c0: int, c1: int, cs: int, extended: bool,
            data_file: bool = False) -> Runs:
    """Runs of the consecutive L2 entries of clusters [c0, c1).

    An entry that merely continues the one before it (same uniform bitmap and the next host cluster,
    or the same unallocated entry) is not classified at all: only run heads go through
    cluster_units. A preallocated or empty table is a handful of heads, not thousands of entries.
    With an external data file (`data_file`) an entry continues a run only at its own guest offset,
    and an entry with offset 0 and COPIED (allocated there) never does."""
    off = w0 & _U64(C.L2E_OFFSET_MASK)
    flags = w0 ^ off
    plain = (w0 & _COMP_BIT) == 0
    d = off[1:] - off[:-1]
    allocated_next = (off[1:] != 0) & plain[1:]
    aligned = (off[:-1] & _U64(cs - 1)) == 0  # (an unaligned cluster reads as INVALID: one run each)
    same = (flags[1:] == flags[:-1]) & ((allocated_next & (d == _U64(cs)) & (off[:-1] != 0) & aligned)
                                        | ((off[1:] == 0) & (off[:-1] == 0) & plain[1:]))
    if bm is not None:
        b = bm[1:]
        same &= (b == bm[:-1]) & ((b == 0) | (b == _ZERO_HALF) | ((b == _FULL) & allocated_next))
    if data_file:
        guest = np.arange(c0 + 1, c0 + len(w0), dtype=np.uint64) * _U64(cs)
        same &= ~allocated_next | (off[1:] == guest)
        same &= ~((off[1:] == 0) & (w0[1:] >= _U64(C.QCOW_OFLAG_COPIED)))
    heads = np.flatnonzero(np.concatenate([[True], ~same]))
    if len(heads) == len(w0):
        units = cluster_units(w0, bm, c0, cs, extended=extended, data_file=data_file)
    else:
        units = cluster_units(w0[heads], None if bm is None else bm[heads], c0, cs, extended=extended,
                              clusters=heads + c0, data_file=data_file)
        units.end = np.append(units.start[1:], c1 * cs)  # heads stretch over the entries they continue
    return units


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
    """Runs of one layer over guest [start, end). With seek_holes (block status as `qemu-img map`
    asks for it) holes of raw files are told apart, and so are holes under NORMAL ranges of a qcow2
    image that QEMU detects as metadata-preallocated."""
    end = min(end, layer.size)
    if getattr(layer, "format", "qcow2") == "raw":
        return raw_runs(layer, start, end, seek_holes=seek_holes)
    runs = qcow2_runs(layer, start, end)
    if seek_holes and (runs.kind == T.NORMAL).any() and metadata_preallocated(layer):
        runs = _split_normal_holes(layer, runs)
    return runs


_PREALLOC_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def metadata_preallocated(img) -> bool:
    """QEMU's qcow2_detect_metadata_preallocation: the image counts as metadata-preallocated when
    at least max(real * 10/9, real + 2) of the clusters in the file have a non-zero refcount, real
    being the clusters' worth of bytes the file really occupies. Errors reading refcounts make it
    False, as in QEMU. Cached per image state (size, blocks, mtime), as QEMU checks once per open."""
    rec = _bundle_record(img)
    if rec is not None:  # a qdebug bundle: the original's verdict (its holes are removed data)
        return bool(rec.get("metadata-preallocated"))
    st = os.fstat(img.fd)
    key = (st.st_size, st.st_blocks, st.st_mtime_ns)
    hit = _PREALLOC_CACHE.get(img)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = img.header
    cs = h.cluster_size
    real = st.st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-st.st_size // cs)
    per_block = h.refcount_block_entries
    count = 0
    try:
        reftable = np.asarray(img.reftable, dtype=np.uint64) & _U64(C.REFT_OFFSET_MASK)
        for b in range(min(len(reftable), -(-end_cluster // per_block))):
            if count >= threshold:
                break
            off = int(reftable[b])
            if off:
                block = img.refcount_block(off)[:end_cluster - b * per_block]
                count += int(np.count_nonzero(block))
    except QcowError:
        count = -1
    result = count >= threshold
    _PREALLOC_CACHE[img] = (key, result)
    return result


def bundle_record(header, path: str | None = None) -> dict | None:
    """The record of a metadata-only bundle (forensics/bundle.py): the qdebug header extension,
    or the side file `PATH.qdebug-bundle.json`; None for other images."""
    import json

    raw = next((e.data for e in header.extensions if e.type == C.QDEBUG_EXT_MAGIC_BUNDLE), None)
    if raw is None and path is not None:
        try:
            with open(path + ".qdebug-bundle.json", "rb") as f:
                raw = f.read(64 << 20)
        except OSError:
            return None
    if raw is None:
        return None
    try:
        rec = json.loads(raw.rstrip(b"\0").decode())
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def _bundle_record(img) -> dict | None:
    return bundle_record(img.header, getattr(img, "path", None))


def _bundle_holes(rec: dict, size: int):
    """(starts, ends) of the hole ranges a bundle's original had in its data clusters, plus
    everything past the end of the file."""
    holes = [h for h in rec.get("data-holes") or () if isinstance(h, list) and len(h) == 2]
    starts = np.array([h[0] for h in holes] + [size], dtype=np.int64)
    ends = np.array([h[1] for h in holes] + [1 << 62], dtype=np.int64)
    order = np.argsort(starts)
    return starts[order], ends[order]


def _cut_by_holes(s: int, h: int, h_end: int, starts: np.ndarray, ends: np.ndarray) -> Runs | None:
    """NORMAL run at guest s, host [h, h_end), cut where it meets the holes (None: it meets none)."""
    k = int(np.searchsorted(ends, h, side="right"))
    pos, st, en, kd, ho = h, [], [], [], []
    while k < len(starts) and starts[k] < h_end:
        a, b = max(int(starts[k]), h), min(int(ends[k]), h_end)
        if a > pos:
            st.append(pos), en.append(a), kd.append(T.NORMAL), ho.append(pos)
        st.append(a), en.append(b), kd.append(NORMAL_HOLE), ho.append(a)
        pos = b
        k += 1
    if not kd:
        return None
    if pos < h_end:
        st.append(pos), en.append(h_end), kd.append(T.NORMAL), ho.append(pos)
    st_a = np.array(st, dtype=np.int64)
    return Runs(st_a - h + s, np.array(en, dtype=np.int64) - h + s, np.array(kd, dtype=np.uint8),
                np.array(ho, dtype=np.int64))


def _split_normal_holes(img, runs: Runs) -> Runs:
    """Cut NORMAL runs where their host range is a hole in the image file (or past its end): those
    parts become NORMAL_HOLE. One SEEK_HOLE per run finds the common all-data case. In a bundle
    the holes are removed data: only the part past the end of the file counts."""
    sel = np.flatnonzero(runs.kind == T.NORMAL)
    cut: list[tuple[int, Runs]] = []
    data = img.data if getattr(img, "data", None) is not None else img  # where the data lives
    fd, lseek, seek_hole = data.fd, os.lseek, os.SEEK_HOLE
    hosts = runs.host[sel]
    rec = _bundle_record(img)
    holes = _bundle_holes(rec, img.file_size) if rec is not None else None
    for i, s, h, h_end in zip(sel.tolist(), runs.start[sel].tolist(), hosts.tolist(),
                              (hosts + runs.end[sel] - runs.start[sel]).tolist()):
        if holes is not None:  # a bundle: the original's holes, not the bundle's
            piece = _cut_by_holes(s, h, h_end, *holes)
            if piece is not None:
                cut.append((i, piece))
            continue
        try:
            if lseek(fd, h, seek_hole) >= h_end:
                continue
        except OSError:
            pass  # ENXIO: at or past the end of the file, all hole
        f = raw_runs(data, h, h_end, seek_holes=True)
        kind = np.where(f.kind == RAW_HOLE, NORMAL_HOLE, T.NORMAL).astype(np.uint8)
        cut.append((i, Runs(f.start - h + s, f.end - h + s, kind, f.start.copy())))
    if not cut:
        return runs
    pieces: list[Runs] = []
    prev = 0
    for i, piece in cut:
        pieces.append(Runs(runs.start[prev:i], runs.end[prev:i], runs.kind[prev:i], runs.host[prev:i]))
        pieces.append(piece)
        prev = i + 1
    pieces.append(Runs(runs.start[prev:], runs.end[prev:], runs.kind[prev:], runs.host[prev:]))
    return Runs.concat(pieces)


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
    if len(runs) == 1 and len(runs[0].start) and runs[0].start[0] == start and runs[0].end[-1] == end:
        r = runs[0]  # one layer covering the range: its runs are the pieces
        return Resolved(r.start, r.end, np.zeros(len(r.start), dtype=np.int64), r.kind, r.host)
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


def resolve_layers(layers, start: int, end: int, *, seek_holes: bool = False) -> Resolved:
    """resolve() over open layers; the backing layers are not scanned when the top layer answers
    for the whole range itself."""
    top = layer_runs(layers[0], start, end, seek_holes=seek_holes)
    sizes = [layer.size for layer in layers]
    if len(layers) == 1 or (len(top.start) and top.start[0] == start and top.end[-1] == end
                            and DECISIVE[top.kind].all()):
        return resolve([top], sizes[:1], start, end)
    runs = [top] + [layer_runs(layer, start, end, seek_holes=seek_holes) for layer in layers[1:]]
    return resolve(runs, sizes, start, end)


# ---- quiet ranges (HX): cost of a scan follows the metadata, not the (attacker-chosen) virtual size ----
def _has_tables(img, c0: int, c1: int) -> bool:
    """Whether any active L1 entry covering guest clusters [c0, c1) points at an L2 table."""
    per = img.header.l2_entries
    seg = np.asarray(img.l1[c0 // per:(c1 - 1) // per + 1], dtype=np.uint64)
    return bool((seg & _U64(C.L1E_OFFSET_MASK)).any())


class QuietMap:
    """Where the layers of a chain have anything at all (an L2 table, raw data): `next_busy(pos)`
    lets a scan jump over empty guest space in one step, so a 2^61-byte virtual disk with one L2
    table costs one table, not 2^29 chunks."""

    def __init__(self, layers):
        self.layers = layers
        self._tables = []
        for layer in layers:
            if getattr(layer, "format", "qcow2") == "raw":
                self._tables.append(None)
                continue
            h = layer.header
            l1 = np.asarray(layer.l1, dtype=np.uint64)
            self._tables.append((np.flatnonzero(l1 & _U64(C.L1E_OFFSET_MASK)), h.l2_entries * h.cluster_size))

    def next_busy(self, pos: int) -> int:
        """The first guest offset >= pos where some layer may have content (a huge number if none)."""
        best = 1 << 63
        for layer, tables in zip(self.layers, self._tables):
            if pos >= layer.size:
                continue
            if tables is None:  # raw: the next data extent (holes read as zeros)
                try:
                    best = min(best, os.lseek(layer.fd, pos, os.SEEK_DATA))
                except OSError:
                    pass
                continue
            idx, cover = tables
            j = int(np.searchsorted(idx, pos // cover))
            if j < len(idx):
                best = min(best, max(pos, int(idx[j]) * cover))
        return best
