"""What the TUI shows, read from an open `Chain` through the engine (no qcow2 rule lives here).

The cluster map asks for blocks of rows; a block gathers the top layer's L2 words with
`Image.l2_table`, classifies them with `subclusters.classify` and asks `Chain.resolve` which layer
answers for each subcluster. Blocks are cached by (block, version): bump `version` after the image
changes (a step, an undo, a repair) and every row is recomputed on its next draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..engine.errors import QcowError
from ..engine.format import constants as C
from ..engine.format.compression import descriptor_fields
from ..engine.format.subclusters import SubclusterType as T
from ..engine.format.subclusters import bitmap_string, classify, cluster_flags, type_counts
from ..engine.read.guest import read_guest, resolve_chain
from ..engine.read.kinds import RAW_DATA, RAW_HOLE
from ..engine.read.l2tables import iter_l2_batches, l2_table_offsets
from ..engine.read.status import IS_DATA
from .iolock import ImageIOLock, reads_image

BLOCK = 256  # map rows per cached block

# How a subcluster reads, after the chain is resolved.
READS_DATA, READS_ZERO, READS_INVALID = 0, 1, 2


@dataclass(frozen=True)
class MapBlock:
    """Rows [first, first + n) of the cluster map."""

    first: int
    word0: np.ndarray  # (n,) uint64, top layer
    bitmap: np.ndarray  # (n,) uint64, top layer (zeros without extended L2)
    types: np.ndarray  # (n, spc) uint8 SubclusterType in the top layer
    depth: np.ndarray  # (n, spc) int16 layer that answers a read of the subcluster
    reads: np.ndarray  # (n, spc) uint8 READS_*
    shared: np.ndarray  # (n,) bool: a host cluster without COPIED (refcount > 1: shared with a snapshot)
    error: str | None = None


@dataclass(frozen=True)
class EntryInfo:
    """One guest cluster's L2 entry, decoded for the inspector."""

    cluster: int
    guest_offset: int
    l1_index: int
    l2_index: int
    l1_entry: int
    l2_offset: int
    word0: int
    bitmap: int
    extended: bool
    copied: bool
    compressed: bool
    host_offset: int | None
    compressed_bytes: int | None
    refcount: int | None
    types: tuple[int, ...]
    depth: tuple[int, ...]
    reads: tuple[int, ...]
    bitmap_string: str
    error: str | None = None
    file_size: int = 0  # of the image file: data at or past it reads as zeros (QEMU pads)

    @property
    def host_past_eof(self) -> bool:
        """The entry's host bytes (data cluster or compressed stream) start at or past the end of the file."""
        return self.host_offset is not None and self.host_offset >= self.file_size > 0

    @property
    def invalid(self) -> bool:
        return T.INVALID in self.types


@dataclass(frozen=True)
class Source:
    """A byte range of a subcluster and where its bytes come from."""

    start: int  # guest offset
    end: int
    depth: int
    reads: int  # READS_*
    label: str


@dataclass(frozen=True)
class SubclusterBytes:
    offset: int
    data: bytes
    sources: tuple[Source, ...]


class ImageModel:
    """Read-side view model over a chain; `chain` may be replaced (a session reopens it)."""

    def __init__(self, chain, io_lock: ImageIOLock | None = None):
        self.io_lock = io_lock or ImageIOLock()
        self.version = 0
        self._blocks: dict[tuple[int, int], MapBlock] = {}
        self.set_chain(chain)

    def set_chain(self, chain) -> None:
        self.chain = chain
        self.invalidate()

    @reads_image
    def invalidate(self) -> None:
        """The image changed: drop every cached row."""
        img = self.chain.top
        img.remap()
        img.reload_header()
        self.version += 1
        self._blocks.clear()

    # ---- geometry --------------------------------------------------------------------------
    @property
    def img(self):
        return self.chain.top

    @property
    def cluster_size(self) -> int:
        return self.img.cluster_size

    @property
    def spc(self) -> int:
        return self.img.header.subclusters_per_cluster if self.img.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.spc

    @property
    def nclusters(self) -> int:
        return -(-self.chain.size // self.cluster_size)

    # ---- map rows --------------------------------------------------------------------------
    @reads_image
    def block(self, b: int) -> MapBlock:
        key = (b, self.version)
        blk = self._blocks.get(key)
        if blk is None:
            if len(self._blocks) > 64:
                self._blocks.clear()
            blk = self._blocks[key] = self._load_block(b)
        return blk

    def row(self, cluster: int) -> tuple[MapBlock, int]:
        b, i = divmod(cluster, BLOCK)
        return self.block(b), i

    def _load_block(self, b: int) -> MapBlock:
        img = self.img
        h = img.header
        first = b * BLOCK
        n = max(0, min(BLOCK, self.nclusters - first))
        w0 = np.zeros(n, dtype=np.uint64)
        bm = np.zeros(n, dtype=np.uint64)
        error = None
        per = h.l2_entries
        c = first
        while c < first + n:
            l1_index = c // per
            stop = min(first + n, (l1_index + 1) * per)
            l2_off = img.l2_offset(l1_index)
            if l2_off:
                try:
                    tw0, tbm = img.l2_table(l2_off, l1_index)
                    i0, i1 = c - l1_index * per, stop - l1_index * per
                    w0[c - first:stop - first] = tw0[i0:i1]
                    if tbm is not None:
                        bm[c - first:stop - first] = tbm[i0:i1]
                except QcowError as e:
                    error = str(e)
            c = stop
        types = classify(w0, bm if h.extended_l2 else None, extended=h.extended_l2)
        spc = types.shape[1]
        depth = np.zeros((n, spc), dtype=np.int16)
        reads = np.where(types == T.INVALID, READS_INVALID,
                         np.where(IS_DATA[types], READS_DATA, READS_ZERO)).astype(np.uint8)
        if n:
            try:
                depth, reads = self._resolve_rows(first, n, spc)
            except QcowError as e:
                error = error or str(e)
        shared = (((w0 & np.uint64(C.L2E_OFFSET_MASK)) != 0)
                  & ((w0 & np.uint64(C.QCOW_OFLAG_COMPRESSED | C.QCOW_OFLAG_COPIED)) == 0))
        return MapBlock(first, w0, bm, types, depth, reads, shared, error)

    def _resolve_rows(self, first: int, n: int, spc: int) -> tuple[np.ndarray, np.ndarray]:
        cs = self.cluster_size
        start = first * cs
        end = min((first + n) * cs, self.chain.size)
        p = resolve_chain(self.chain, start, end)
        starts = start + np.arange(n * spc, dtype=np.int64) * (cs // spc)
        j = np.clip(np.searchsorted(p.start, np.minimum(starts, end - 1), side="right") - 1, 0, len(p.start) - 1)
        kind = p.kind[j]
        reads = np.where(kind == T.INVALID, READS_INVALID, np.where(IS_DATA[kind], READS_DATA, READS_ZERO))
        return p.depth[j].astype(np.int16).reshape(n, spc), reads.astype(np.uint8).reshape(n, spc)

    # ---- one entry -------------------------------------------------------------------------
    @reads_image
    def entry(self, cluster: int) -> EntryInfo:
        img = self.img
        h = img.header
        blk, i = self.row(cluster)
        per = h.l2_entries
        l1_index, l2_index = divmod(cluster, per)
        l1_entry = int(img.l1[l1_index]) if l1_index < h.l1_size else 0
        w0, bm = int(blk.word0[i]), int(blk.bitmap[i])
        compressed = bool(w0 & C.QCOW_OFLAG_COMPRESSED)
        host = comp_bytes = refcount = None
        if compressed:
            host, comp_bytes = descriptor_fields(w0, h.cluster_bits)
        elif w0 & C.L2E_OFFSET_MASK:
            host = w0 & C.L2E_OFFSET_MASK
        if host is not None:
            try:
                refcount = img.refcount(host >> h.cluster_bits)
            except QcowError:
                refcount = None
        types = blk.types[i]
        return EntryInfo(
            cluster=cluster, guest_offset=cluster * self.cluster_size, l1_index=l1_index, l2_index=l2_index,
            l1_entry=l1_entry, l2_offset=l1_entry & C.L1E_OFFSET_MASK, word0=w0, bitmap=bm,
            extended=h.extended_l2, copied=bool(w0 & C.QCOW_OFLAG_COPIED), compressed=compressed,
            host_offset=host, compressed_bytes=comp_bytes, refcount=refcount,
            types=tuple(int(t) for t in types), depth=tuple(int(d) for d in blk.depth[i]),
            reads=tuple(int(r) for r in blk.reads[i]),
            bitmap_string=bitmap_string(w0, bm, extended=h.extended_l2), error=blk.error, file_size=img.file_size)

    @reads_image
    def subcluster_bytes(self, cluster: int, sc: int) -> SubclusterBytes:
        """Guest bytes of one subcluster and, for each piece, the layer they come from."""
        chain = self.chain
        scs = self.subcluster_size
        start = cluster * self.cluster_size + sc * scs
        end = min(start + scs, chain.size)
        if start >= end:
            return SubclusterBytes(start, b"", ())
        p = resolve_chain(chain, start, end)
        out = bytearray(end - start)
        sources = []
        for k in range(len(p.start)):
            s, e, d, kind, host = (int(p.start[k]), int(p.end[k]), int(p.depth[k]), int(p.kind[k]),
                                   int(p.host[k]))
            where = "this image" if d == 0 else f"backing file at depth {d}"
            if kind == T.INVALID:
                sources.append(Source(s, e, d, READS_INVALID,
                                      f"{where}: invalid L2 entry, QEMU fails the read (EIO)"))
                continue
            if IS_DATA[kind]:
                what = {T.COMPRESSED: "compressed cluster", RAW_DATA: "raw data"}.get(kind, "data")
                at = f" @ host 0x{host:x}" if kind != T.COMPRESSED else ""
                if kind == T.NORMAL and host + (e - s) > chain.layers[d].file_size:
                    at += " (past the end of the file: reads as zeros)"
                label = f"{where}: {what}{at}"
                reads = READS_DATA
            elif kind in (T.ZERO_PLAIN, T.ZERO_ALLOC, RAW_HOLE):
                label = f"{where}: zeros ({T(kind).name if kind != RAW_HOLE else 'hole'})"
                reads = READS_ZERO
            else:
                label = "zeros: unallocated in every layer" if d == len(chain.layers) - 1 or e <= start else \
                    f"zeros: past the end of the backing file at depth {d + 1}"
                reads = READS_ZERO
            if reads == READS_DATA:
                out[s - start:e - start] = read_guest(chain, s, e - s)
            sources.append(Source(s, e, d, reads, label))
        return SubclusterBytes(start, bytes(out), tuple(sources))

    # ---- search ----------------------------------------------------------------------------
    @reads_image
    def find_next(self, cluster: int, what: str) -> int | None:
        """First cluster after `cluster` that is `what` ('invalid', 'allocated', 'zero') in the top layer."""
        img = self.img
        h = img.header
        per = h.l2_entries
        tables = l2_table_offsets(img)
        if len(tables):
            tables = tables[tables[:, 0] >= (cluster + 1) // per]
        for gcs, w0, bm in iter_l2_batches(img, tables):
            hit = entry_mask(w0, bm, extended=h.extended_l2, what=what) & (gcs > cluster)
            idx = np.flatnonzero(hit)
            if len(idx):
                return int(gcs[idx[0]])
        return None

    @reads_image
    def count_types(self, progress: Callable[[float], None] | None = None) -> dict[str, int]:
        """Subclusters of each type in the top layer (a whole-image scan: run it in a worker)."""
        img = self.img
        h = img.header
        counts = np.zeros(len(T), dtype=np.int64)
        covered = 0
        ntables = max(1, len(l2_table_offsets(img)))
        done = 0
        for gcs, w0, bm in iter_l2_batches(img):
            counts += type_counts(w0, bm, extended=h.extended_l2)
            covered += len(gcs)
            done += -(-len(gcs) // h.l2_entries)
            if progress:
                progress(min(1.0, done / ntables))
        counts[T.UNALLOCATED_PLAIN] += (h.guest_clusters - covered) * self.spc
        return {t.name: int(counts[t]) for t in T}

    def count_delta(self, counts: dict[str, int], changes) -> dict[str, int]:
        """Counts after (ClusterChange, +1 applied | -1 undone) pairs: the entries' types swapped."""
        ext = self.img.extended_l2
        out = np.array([counts[t.name] for t in T], dtype=np.int64)
        for c, sign in changes:
            before = _counts_of(c.word0_before, c.l2_bitmap_before, ext)
            after = _counts_of(c.word0_after, c.l2_bitmap_after, ext)
            out += sign * (after - before)
        return {t.name: int(out[t]) for t in T}


def _counts_of(word0: int, bitmap: int, extended: bool) -> np.ndarray:
    return type_counts(np.array([word0], dtype=np.uint64), np.array([bitmap], dtype=np.uint64) if extended else None,
                       extended=extended)


def entry_mask(w0: np.ndarray, bm: np.ndarray | None, *, extended: bool, what: str) -> np.ndarray:
    """Which L2 entries are invalid / allocated (a host cluster or compressed) / have a zero subcluster."""
    w0 = np.asarray(w0, dtype=np.uint64)
    compressed, allocated, invalid = cluster_flags(w0, bm, extended=extended)
    if what == "invalid":
        return invalid
    if what == "allocated":
        return allocated | compressed
    if what == "zero":
        if extended and bm is not None:
            return ~compressed & ~invalid & ((np.asarray(bm, dtype=np.uint64) >> np.uint64(32)) != 0)
        return ~compressed & ((w0 & np.uint64(C.QCOW_OFLAG_ZERO)) != 0)
    raise ValueError(f"unknown search {what!r}")
