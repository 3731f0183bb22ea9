"""`qemu-img check` for qcow2, rebuilt with numpy: same findings, same counts, same exit code.

QEMU 7.2 (block/qcow2-refcount.c) counts references to every host cluster by walking the header,
the active and snapshot L1/L2 tables, the snapshot table, the refcount table, the bitmaps and the
refcount blocks, then compares that in-memory table with the on-disk refcounts and checks the
COPIED flags. Here each walk step turns a whole L2 table (a batch of tables) into arrays and the
reference counts are one `np.bincount`; per-entry rules are boolean masks. The counting quirks are
QEMU's and kept on purpose (a region ending less than one cluster past EOF is fine; references
are only compared for clusters below the end of the file; a compressed cluster with a non-zero
bitmap is not counted at all), because the counts must equal qemu-img's on the same image.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from ..errors import CorruptImage, QcowError
from ..file.chain import backing_warning
from ..file.image import Image
from ..format import constants as C
from ..format.bitmaps import (
    BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BME_TABLE_ENTRY_RESERVED_MASK,
    bitmaps_extension,
    directory_entries,
)
from ..format.refcounts import unpack_refcounts

# Keys in the order qemu-img prints them (its QDict bucket order), "findings" last.
JSON_KEYS = ("image-end-offset", "compressed-clusters", "total-clusters", "corruptions", "corruptions-fixed",
             "check-errors", "leaks", "leaks-fixed", "allocated-clusters", "filename", "format",
             "fragmented-clusters")
_ALWAYS = ("check-errors", "filename", "format")
MAX_FINDINGS_PER_KIND = 10000
_U64 = np.uint64
# L2 tables checked as one array pass. 16 (1 MiB of 64 KiB tables): the per-batch temporaries stay
# small enough to be reused by malloc instead of mapped and faulted in afresh each time; measured on
# 1 TiB preallocated: 64 -> 16 cut the peak by 15 MiB and the time by half (most of it page faults).
_BATCH_TABLES = 16
_FEW = 8  # regions counted one by one by `inc` (below this, numpy's per-call cost dominates)
_MERGE_BATCHES = 64  # sparse batches checked as one (only their non-zero entries are kept)


class FindingKind(str, Enum):
    """The stable machine name of each kind of finding (`kind` in JSON)."""

    BITMAP_DIRECTORY = "bitmap-directory"
    BITMAP_TABLE_ENTRY = "bitmap-table-entry"
    CHECK_FAILED = "check-failed"
    COMPRESSED_BITMAP = "compressed-bitmap"
    COMPRESSED_COPIED = "compressed-copied"
    COMPRESSED_DATA_FILE = "compressed-data-file"
    COPIED_DATA = "copied-data"
    COPIED_L1 = "copied-l1"
    CORRUPT_BIT = "corrupt-bit"
    DATA_CLUSTER_UNALIGNED = "data-cluster-unaligned"
    DIRTY_BIT = "dirty-bit"
    INVALID_BITMAP_ALLOCATED = "invalid-bitmap-allocated"
    INVALID_BITMAP_UNALLOCATED = "invalid-bitmap-unallocated"
    L1_RESERVED_BITS = "l1-reserved-bits"
    L2_RESERVED_BITS = "l2-reserved-bits"
    L2_TABLE_UNALIGNED = "l2-table-unaligned"
    LEAK = "leak"
    PREALLOC_CLUSTER_UNALIGNED = "prealloc-cluster-unaligned"
    REFBLOCK_OUTSIDE_IMAGE = "refblock-outside-image"
    REFBLOCK_REFCOUNT = "refblock-refcount"
    REFBLOCK_UNALIGNED = "refblock-unaligned"
    REFCOUNT_OVERFLOW = "refcount-overflow"
    REFCOUNT_TOO_LOW = "refcount-too-low"
    REFCOUNT_UNREADABLE = "refcount-unreadable"
    REFCOUNT_ZERO = "refcount-zero"
    REFTABLE_RESERVED_BITS = "reftable-reserved-bits"
    REGION_PAST_EOF = "region-past-eof"
    SNAPSHOT_L1_TOO_LARGE = "snapshot-l1-too-large"
    SNAPSHOT_L1_UNALIGNED = "snapshot-l1-unaligned"
    TRUNCATED = "truncated"
    BACKING_OUTSIDE_DIRECTORY = "backing-outside-directory"


class Severity(str, Enum):
    ERROR = "error"  # a corruption (qemu-img check counts it under "corruptions")
    LEAK = "leak"  # a leaked cluster (counted under "leaks")
    INFO = "info"  # worth knowing, not counted (the dirty bit...)


@dataclass(frozen=True)
class Finding:
    """One problem, located. `kind` is a stable machine name; `message` is QEMU's text."""

    kind: FindingKind
    severity: Severity
    message: str
    l1_index: int | None = None
    l2_index: int | None = None
    guest_offset: int | None = None
    host_offset: int | None = None
    subclusters: tuple[int, ...] = ()
    repairable_by_qemu: bool = False
    snapshot: str | None = None  # None: the active L1 table; else the snapshot's id
    entry: int | None = None  # L2 word 0 (or L1 / reftable entry) as found
    bitmap: int | None = None
    l2_offset: int | None = None
    cluster: int | None = None  # host cluster index (refcount findings)
    refcount: int | None = None
    reference: int | None = None

    def to_json(self) -> dict:
        out = {"kind": self.kind.value, "severity": self.severity.value, "message": self.message}
        for k in ("l1_index", "l2_index", "guest_offset", "host_offset", "snapshot", "entry", "bitmap",
                  "l2_offset", "cluster", "refcount", "reference"):
            v = getattr(self, k)
            if v is not None:
                out[k.replace("_", "-")] = v
        if self.subclusters:
            out["subclusters"] = list(self.subclusters)
        out["repairable-by-qemu"] = self.repairable_by_qemu
        return out

    def place(self) -> str:
        """Where, in words: snapshot, L1/L2 index, guest and host offsets, subclusters."""
        parts = []
        if self.snapshot is not None:
            parts.append(f"snapshot {self.snapshot}")
        if self.l1_index is not None:
            parts.append(f"L1 index {self.l1_index}")
        if self.l2_index is not None:
            parts.append(f"L2 index {self.l2_index}")
        if self.guest_offset is not None:
            parts.append(f"guest 0x{self.guest_offset:x}")
        if self.host_offset is not None:
            parts.append(f"host 0x{self.host_offset:x}")
        if self.cluster is not None and self.host_offset is None:
            parts.append(f"host cluster {self.cluster}")
        if self.subclusters:
            parts.append("subclusters " + ",".join(map(str, self.subclusters)))
        return ", ".join(parts)


@dataclass(frozen=True)
class CheckReport:
    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: tuple[Finding, ...] = ()
    rebuild_needed: bool = False  # a refcount of 0 for a referenced cluster, or broken refcount structure
    unlisted: int = 0  # findings past MAX_FINDINGS_PER_KIND of their kind: counted, not in `findings`
    # The reference count QEMU computes per host cluster (what the refcounts should be); for repair.
    references: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 1 check errors, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def counts(self) -> dict:
        """The qemu-img check --output=json object, same keys, same presence rules, same order."""
        vals = {"image-end-offset": self.image_end_offset, "compressed-clusters": self.compressed_clusters,
                "total-clusters": self.total_clusters, "corruptions": self.corruptions,
                "corruptions-fixed": self.corruptions_fixed, "check-errors": self.check_errors,
                "leaks": self.leaks, "leaks-fixed": self.leaks_fixed,
                "allocated-clusters": self.allocated_clusters, "filename": self.filename,
                "format": self.format, "fragmented-clusters": self.fragmented_clusters}
        return {k: vals[k] for k in JSON_KEYS if k in _ALWAYS or vals[k]}

    def to_json(self) -> dict:
        out = self.counts()
        out["findings"] = [f.to_json() for f in self.findings]
        return out


# ---- the walk ------------------------------------------------------------------------------------
class _Ctx:
    """State of one check run: the growing in-memory refcount table and the results so far.

    Memory is what limits how many checks run side by side (a fleet scan), so the two per-cluster
    arrays are as narrow as their contents allow: `refs` (the references counted so far) starts at
    one byte a cluster and widens only when some cluster could outgrow it, and the on-disk
    refcounts are kept as one flag a cluster (is it 1? all the COPIED rules ask) plus, per refcount
    block, whether QEMU could read it; exact on-disk values are read again where a finding or the
    final comparison needs them. A 1 TiB image (16.8M clusters) needs ~34 MB for both instead of
    ~168 MB."""

    def __init__(self, img: Image, progress):
        self.img = img
        h = img.header
        self.h = h
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.file_len = img.file_size
        self.nb = -(-self.file_len // self.cs)
        self.refs = np.zeros(self.nb, dtype=np.uint8)
        self._bound = 0  # no cluster has more references than this (so `refs` cannot overflow)
        self.findings: list[Finding] = []
        self.copied: list[Finding] = []
        self.kind_counts: dict[FindingKind, int] = {}
        self.corruptions = 0
        self.check_errors = 0
        self.allocated = self.fragmented = self.compressed = 0
        self.rebuild = False
        self.progress = progress
        self.words = np.frombuffer(img.mm, dtype=">u8", count=self.file_len // 8) if self.file_len >= 8 else \
            np.zeros(0, ">u8")
        self.refmax = min((1 << h.refcount_bits) - 1, 1 << 62)  # 64-bit refcounts never overflow here
        self._one: tuple[np.ndarray, np.ndarray] | None = None
        self._block_buf: np.ndarray | None = None

    # findings
    def add(self, f: Finding, *, copied: bool = False) -> None:
        n = self.kind_counts.get(f.kind, 0)
        self.kind_counts[f.kind] = n + 1
        if n < MAX_FINDINGS_PER_KIND:
            (self.copied if copied else self.findings).append(f)

    # reading with QEMU's zero padding past EOF
    def u64s(self, offset: int, count: int) -> np.ndarray:
        if offset % 8 == 0 and offset + count * 8 <= self.file_len:
            return self.words[offset // 8: offset // 8 + count]
        return np.frombuffer(self.img.pread(offset, count * 8), dtype=">u8")

    def read_into(self, buf: np.ndarray, offset: int) -> None:
        """Fill `buf` with the file's bytes at `offset` (zeros past the image's end, whatever the
        file holds beyond it) with one pread: nothing of the image gets mapped, so no page of it is
        counted in this process's memory, and there are no page faults to take."""
        nbytes, end = buf.nbytes, self.file_len
        data = buf.reshape(-1).view(np.uint8)
        if offset + nbytes <= end:
            got = os.preadv(self.img.fd, [data], offset)
        else:
            got = os.preadv(self.img.fd, [data[:end - offset]], offset) if offset < end else 0
        if got < nbytes:
            data[got:] = 0

    # qcow2_inc_refcounts_imrt over arrays of regions
    def inc(self, offsets: np.ndarray, sizes: np.ndarray | int, what: str = "") -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.size <= _FEW:  # a few regions: cheaper one by one than through the array passes
            each = sizes.tolist() if isinstance(sizes, np.ndarray) else [sizes] * offsets.size
            for o, s in zip(offsets.tolist(), each):
                self.inc_region(o, s)
            return
        sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), offsets.shape)
        keep = sizes > 0
        past = keep & (offsets + sizes - self.file_len >= self.cs)
        if past.any():
            for o, s in zip(offsets[past].tolist(), sizes[past].tolist()):
                self._past_eof(o, s)
            keep &= ~past
        offsets, sizes = offsets[keep], sizes[keep]
        if offsets.size == 0:
            return
        first = offsets >> self.cb
        last = (offsets + sizes - 1) >> self.cb
        n = last - first + 1
        if (n == 1).all():
            idx = first
        else:
            idx = np.repeat(first, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        self._grow(int(idx.max()))
        self.inc_clusters(idx)

    def inc_region(self, offset: int, size: int) -> None:
        """`inc` of one region (the header, a table): the same rules without array machinery,
        which would cost more than the counting on a small image."""
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self._past_eof(offset, size)
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        self._grow(last)
        self._room(1)
        self.refs[first:last + 1] += 1

    def _past_eof(self, offset: int, size: int) -> None:
        self.corruptions += 1
        self.add(Finding(FindingKind.REGION_PAST_EOF, Severity.ERROR, "ERROR: counting reference for region exceeding the end of "
                         f"the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}", host_offset=offset))

    def _grow(self, hi: int) -> None:
        """`refs` covers host cluster `hi` (references less than a cluster past EOF are counted)."""
        if hi >= len(self.refs):
            grown = np.zeros(hi + 1, dtype=self.refs.dtype)
            grown[:len(self.refs)] = self.refs
            self.refs = grown

    def inc_clusters(self, idx: np.ndarray) -> None:
        """+1 for each host cluster index (all inside `refs`: no EOF rule to apply)."""
        lo, hi = int(idx.min()), int(idx.max())
        if hi - lo > 8 * len(idx):  # few clusters spread over the file: no dense pass over it
            self._room(int(np.unique(idx, return_counts=True)[1].max()))
            np.add.at(self.refs, idx, 1)
            return
        b = np.bincount(idx - lo)
        self._room(int(b.max()))
        seg = self.refs[lo:lo + len(b)]
        np.add(seg, b, out=seg, casting="unsafe")  # cannot wrap: _room made `refs` wide enough

    def _room(self, most: int) -> None:
        """Make `refs` wide enough for `most` more references to any one cluster. The bound grows by
        each call's largest increment and is only made exact (one pass) when it would not fit."""
        if self._bound + most > _TOP[self.refs.dtype]:
            self._bound = int(self.refs.max()) if self.refs.size else 0
            dt = self.refs.dtype
            while self._bound + most > _TOP[dt]:
                dt = _WIDER[dt]
            if dt != self.refs.dtype:
                self.refs = self.refs.astype(dt)
        self._bound += most

    # on-disk refcounts (qcow2_get_refcount), vectorized; errors where the refblock offset is unaligned
    def block_values(self, tbl_index: int) -> np.ndarray | None:
        """Decoded refcount block `tbl_index` as uint64 (zeros past EOF), None if its offset is unaligned."""
        vals = self.block_raw(tbl_index)
        return None if vals is None else vals.astype(np.uint64)

    def block_raw(self, tbl_index: int) -> np.ndarray | None:
        """Refcount block `tbl_index` in its narrowest native dtype; None if its offset is unaligned."""
        rt = self.img.reftable
        off = int(rt[tbl_index]) & C.REFT_OFFSET_MASK if tbl_index < len(rt) else 0
        if off == 0:
            return np.zeros(self.h.refcount_block_entries, dtype=np.uint8)
        if off % self.cs:
            return None
        if self._block_buf is None:
            self._block_buf = np.empty(self.cs, dtype=np.uint8)
        self.read_into(self._block_buf, off)
        return unpack_refcounts(self._block_buf, self.h.refcount_order, narrow=True)  # a copy

    def one_array(self) -> tuple[np.ndarray, np.ndarray]:
        """Per host cluster of [0, nb): is its on-disk refcount 1 (built once); per refcount block:
        could it be read (False: unaligned offset, QEMU's EIO)."""
        if self._one is None:
            per = self.h.refcount_block_entries
            nblk = -(-self.nb // per)
            one = np.zeros(nblk * per, dtype=bool)
            readable = np.ones(nblk, dtype=bool)
            for b in range(nblk):
                vals = self.block_raw(b)
                if vals is None:
                    readable[b] = False
                else:
                    np.equal(vals, 1, out=one[b * per:(b + 1) * per])
            self._one = (one, readable)
        return self._one

    def readable(self, clusters: np.ndarray) -> np.ndarray:
        """Whether QEMU can read the refcount of each host cluster (its block's offset is aligned)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        _one, readable = self.one_array()
        blk = clusters >> (self.h.refcount_block_entries.bit_length() - 1)
        if clusters.size == 0 or int(blk.max()) < len(readable):
            return readable[blk]
        return np.array([self.block_raw(t) is not None for t in blk.tolist()], dtype=bool)

    def is_one(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(on-disk refcount == 1, readable) of host cluster indices (inside the file: the fast way)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        one, readable = self.one_array()
        if clusters.size == 0 or int(clusters.max()) < len(one):
            ok = readable[clusters >> (self.h.refcount_block_entries.bit_length() - 1)]
            return one[clusters] & ok, ok
        vals, ok = self.ondisk(clusters)
        return vals == 1, ok

    def ondisk(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(refcounts, ok) of host cluster indices as QEMU reads them: each refcount block involved
        is read once per call (for findings and repairs: the rules themselves use `is_one`)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        vals = np.zeros(clusters.shape, dtype=np.uint64)
        ok = np.ones(clusters.shape, dtype=bool)
        if clusters.size == 0:
            return vals, ok
        bits = self.h.refcount_block_entries.bit_length() - 1
        tbl = clusters >> bits
        for t in np.unique(tbl).tolist():
            sel = tbl == t
            block = self.block_raw(t)
            if block is None:
                ok[sel] = False
            else:
                vals[sel] = block[clusters[sel] & ((1 << bits) - 1)]
        return vals, ok


_WIDER = {np.dtype(np.uint8): np.dtype(np.uint16), np.dtype(np.uint16): np.dtype(np.uint32),
          np.dtype(np.uint32): np.dtype(np.int64)}
_TOP = {dt: int(np.iinfo(dt).max) for dt in (*_WIDER, np.dtype(np.int64))}


def _walk_l1(ctx: _Ctx, l1_offset: int, l1_size: int, *, active: bool, snapshot: str | None) -> None:
    """check_refcounts_l1 + check_refcounts_l2 (+ the COPIED checks for the active table)."""
    if not l1_size:
        return
    cs = ctx.cs
    ctx.inc_region(l1_offset, l1_size * 8)
    l1 = ctx.u64s(l1_offset, l1_size).astype(np.uint64)
    used = np.flatnonzero(l1)
    if used.size == 0:
        return
    entries = l1[used]
    bad = (entries & _U64(C.L1E_RESERVED_MASK)) != 0
    for i in np.flatnonzero(bad).tolist():
        e = int(entries[i])
        ctx.corruptions += 1
        ctx.add(Finding(FindingKind.L1_RESERVED_BITS, Severity.ERROR, f"ERROR found L1 entry with reserved bits set: {e:x}",
                        l1_index=int(used[i]), host_offset=e & C.L1E_OFFSET_MASK, snapshot=snapshot, entry=e))
    l2_offsets = (entries & _U64(C.L1E_OFFSET_MASK)).astype(np.int64)
    ctx.inc(l2_offsets, cs, "L2 table")
    for i in np.flatnonzero(l2_offsets % cs).tolist():
        o = int(l2_offsets[i])
        ctx.corruptions += 1
        ctx.add(Finding(FindingKind.L2_TABLE_UNALIGNED, Severity.ERROR,
                        f"ERROR l2_offset={o:x}: Table is not cluster aligned; L1 entry corrupted",
                        l1_index=int(used[i]), host_offset=o, snapshot=snapshot, entry=int(entries[i])))
    if active:
        _copied_l1(ctx, used, entries, l2_offsets)
    scan = _Scan(ctx, len(used))
    for start in range(0, len(used), _BATCH_TABLES):
        sl = slice(start, start + _BATCH_TABLES)
        _check_l2_batch(ctx, used[sl], l2_offsets[sl], scan, active=active, snapshot=snapshot)
        if start + _BATCH_TABLES >= len(used):
            _flush_sparse(ctx, scan, active=active, snapshot=snapshot)
        if ctx.progress and active:
            ctx.progress(min(start + _BATCH_TABLES, len(used)), len(used))


def _copied_l1(ctx: _Ctx, l1_indices, entries, l2_offsets) -> None:
    """check_oflag_copied, L1 part: COPIED set exactly when the L2 table's on-disk refcount is 1."""
    nz = l2_offsets != 0
    one, ok = ctx.is_one(l2_offsets >> ctx.cb)
    copied = (entries & _U64(C.QCOW_OFLAG_COPIED)) != 0
    wrong = np.flatnonzero(nz & ok & (one != copied))
    rc, _ok = ctx.ondisk(l2_offsets[wrong] >> ctx.cb)
    for i, r in zip(wrong.tolist(), rc.tolist()):
        e = int(entries[i])
        ctx.corruptions += 1
        ctx.add(Finding(FindingKind.COPIED_L1, Severity.ERROR,
                        f"ERROR OFLAG_COPIED L2 cluster: l1_index={int(l1_indices[i])} l1_entry={e:x} refcount={r}",
                        l1_index=int(l1_indices[i]), host_offset=int(l2_offsets[i]), entry=e, refcount=r,
                        repairable_by_qemu=True), copied=True)


def _read_tables(ctx: _Ctx, l2_offsets: np.ndarray, raw: np.ndarray, mask: np.ndarray) -> None:
    """Read the L2 tables at `l2_offsets` into the rows of `raw` (file byte order, zeros past EOF)
    and mark their non-zero words in `mask`, each table while it is still in the CPU cache. One
    pread per table into memory that is reused (cheaper than scanning the mapping)."""
    for k, o in enumerate(l2_offsets.tolist()):
        ctx.read_into(raw[k], o)
        np.not_equal(raw[k], 0, out=mask[k])


def _native(a: np.ndarray) -> np.ndarray:
    """File-order (big-endian) words -> native integers, in place."""
    if sys.byteorder == "little":
        a.byteswap(inplace=True)
    return a


def _split(ctx: _Ctx, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(word0, bitmap) as contiguous native (tables, entries) arrays; bitmap None for standard L2."""
    _native(raw)
    if not ctx.h.extended_l2:
        return raw, None
    return np.ascontiguousarray(raw[:, 0::2]), np.ascontiguousarray(raw[:, 1::2])


def _sparse_entries(ctx: _Ctx, raw: np.ndarray, mask: np.ndarray):
    """(entries, word0, bitmap or None) of the non-zero entries of the tables `raw` (`mask`: their
    non-zero words): entries are flat indices over the tables seen as one array, values native."""
    ext = ctx.h.extended_l2
    per = 2 if ext else 1  # words per entry
    flat = mask.reshape(-1)
    # 8 mask bytes at a time: the few non-zero groups, then the entries inside them
    lanes = flat.view(np.uint16) if ext else flat.view(np.uint8)  # one lane per entry
    hit = np.flatnonzero(flat.view(np.uint64) != 0)  # (numpy finds non-zero booleans fastest)
    cand = (hit[:, None] * (8 // per) + np.arange(8 // per)).reshape(-1)
    ent = cand[lanes[cand] != 0]
    words = raw.reshape(-1)
    return ent, _native(words[ent * per]), _native(words[ent * per + 1]) if ext else None


def _fragmented(table: np.ndarray, host: np.ndarray, cs: int) -> int:
    """QEMU's fragmented-clusters count for data clusters listed in L2 order (`table`: which L2
    table each is in, `host`: its offset): each one not right after the one before in its table."""
    if table.size < 2:
        return 0
    return int(np.count_nonzero((table[1:] == table[:-1]) & (host[1:] != host[:-1] + _U64(cs))))


def _sparse_l2_batch(ctx: _Ctx, ent: np.ndarray, w0: np.ndarray, bm, l2_offsets: np.ndarray, *, active: bool):
    """`_fast_l2_batch` for tables that are mostly empty: only the non-zero entries are looked at
    (`ent`: their indices in the batch's tables seen as one array, `w0`/`bm` their native words).
    Healthy compressed clusters are covered too (images converted with compression are common).
    Same return values."""
    cs, cb = ctx.cs, ctx.cb
    n = ctx.h.l2_entries
    if ctx.h.has_data_file:  # (an external data file: the full rules know its exceptions)
        return False
    comp = (w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) != 0
    nc = int(np.count_nonzero(comp))
    if nc:  # no COPIED flag, no bitmap, data inside the file: else the full rules
        cw = w0[comp]
        if (cw & _U64(C.QCOW_OFLAG_COPIED)).any() or (bm is not None and bm[comp].any()):
            return False
        x = 62 - (cb - 8)
        coff = (cw & _U64((1 << x) - 1)).astype(np.int64)
        csize = ((cw >> _U64(x)) & _U64((1 << (cb - 8)) - 1)).astype(np.int64) * 512 + 512 - (coff & 511)
        if (coff + csize - ctx.file_len >= cs).any():
            return False
        keep = ~comp
        ent, w0, bm = ent[keep], w0[keep], None if bm is None else bm[keep]
    odd = _U64(C.L2E_STD_RESERVED_MASK | ((cs - 1) & C.L2E_OFFSET_MASK))
    if (w0 & odd).any():
        return False
    off = w0 & _U64(C.L2E_OFFSET_MASK)
    has_off = off != 0
    if bm is not None:
        alloc = bm & _U64(0xFFFFFFFF)
        if (alloc & (bm >> _U64(32))).any() or alloc[~has_off].any():
            return False
    o = off[has_off]
    clusters = o >> _U64(cb)
    if clusters.size and int(clusters.max()) >= ctx.nb:
        return False
    if nc:
        ctx.inc(coff, csize, "compressed cluster")
    if clusters.size:
        ctx.inc_clusters(clusters.astype(np.int64))
    if not active:
        return True
    ctx.allocated += nc + int(clusters.size)
    ctx.compressed += nc
    ctx.fragmented += nc + _fragmented((ent // n)[has_off], o, cs)
    if not clusters.size:
        return True
    if not (ctx.readable(l2_offsets >> cb) & (l2_offsets != 0)).all():
        return "copied"
    one, _readable = ctx.one_array()
    if (one[clusters] != (w0[has_off] >= _U64(C.QCOW_OFLAG_COPIED))).any():
        return "copied"
    return True


def _fast_l2_batch(ctx: _Ctx, w0: np.ndarray, bm, l2_offsets: np.ndarray, *, active: bool) -> bool:
    """The common case in few array passes: no compressed, reserved, unaligned or invalid entry.
    Returns False (nothing counted) when the batch needs the full rules."""
    cs, cb = ctx.cs, ctx.cb
    odd = _U64(C.QCOW_OFLAG_COMPRESSED | C.L2E_STD_RESERVED_MASK | ((cs - 1) & C.L2E_OFFSET_MASK))
    if ctx.h.has_data_file or (w0 & odd).any():
        return False
    off = w0 & _U64(C.L2E_OFFSET_MASK)
    has_off = off != 0
    every = bool(has_off.all())
    if bm is not None:
        halves = bm.view(np.uint32).reshape(bm.shape + (2,))  # native little-endian: [alloc, zero]
        alloc = halves[..., 0]
        if np.bitwise_and(alloc, halves[..., 1]).any():
            return False
        if not every and alloc[~has_off].any():
            return False
    clusters = (off.ravel() if every else off[has_off]) >> _U64(cb)
    if clusters.size:
        if int(clusters.max()) >= ctx.nb:  # past EOF: QEMU's exact rules
            return False
        ctx.inc_clusters(clusters.astype(np.int64))
    if not active:
        return True
    ctx.allocated += int(clusters.size)
    if every:
        ctx.fragmented += int(np.count_nonzero(np.diff(off, axis=1) != _U64(cs)))
    else:
        rows, cols = np.nonzero(has_off)
        ctx.fragmented += _fragmented(rows, off[rows, cols], cs)
    # COPIED against the on-disk refcounts (tables at offset 0 or with unreadable refcounts skipped)
    usable = ctx.readable(l2_offsets >> cb) & (l2_offsets != 0)
    if clusters.size and usable.all():
        one, _readable = ctx.one_array()
        rc_one = one[clusters]
        copied = (w0 if every else w0[has_off]).ravel() >= _U64(C.QCOW_OFLAG_COPIED)
        if not (rc_one.all() and copied.all()) and (rc_one != copied).any():
            return "copied"
    elif clusters.size:
        return "copied"
    return True


class _Scan:
    """One walk's reusable memory for a batch of tables (their words and non-zero mask), and the
    mostly empty batches waiting to be checked together: only their non-zero entries are kept."""

    def __init__(self, ctx: _Ctx, tables: int):
        width = ctx.h.l2_entries * (2 if ctx.h.extended_l2 else 1)
        rows = min(_BATCH_TABLES, tables)  # (2 MiB clusters: 2 MiB a table)
        self.raw = np.empty((rows, width), dtype=np.uint64)
        self.mask = np.empty((rows, width), dtype=bool)
        self.pending: list[tuple[np.ndarray, np.ndarray, tuple]] = []  # (l1 indices, offsets, entries)


def _check_l2_batch(ctx: _Ctx, l1_indices: np.ndarray, l2_offsets: np.ndarray, scan: _Scan, *,
                    active: bool, snapshot: str | None) -> None:
    """One batch of L2 tables. A mostly empty batch only leaves its non-zero entries in
    `scan.pending`: sparse batches are checked together (`_flush_sparse`: the same array passes
    for many batches); any other batch is checked now, after the pending ones (findings stay in
    QEMU's order)."""
    raw, mask = scan.raw[:len(l2_offsets)], scan.mask[:len(l2_offsets)]
    _read_tables(ctx, l2_offsets, raw, mask)
    if np.count_nonzero(mask) * 4 < mask.size:
        scan.pending.append((l1_indices, l2_offsets, _sparse_entries(ctx, raw, mask)))
        if len(scan.pending) == _MERGE_BATCHES:
            _flush_sparse(ctx, scan, active=active, snapshot=snapshot)
        return
    _flush_sparse(ctx, scan, active=active, snapshot=snapshot)
    _check_tables(ctx, l1_indices, l2_offsets, raw, active=active, snapshot=snapshot)


def _flush_sparse(ctx: _Ctx, scan: _Scan, *, active: bool, snapshot: str | None) -> None:
    """Check the pending sparse batches as one when the sparse rules cover them all; otherwise
    give each batch, in order, every rule (over the non-zero entries kept: this is rare)."""
    if not scan.pending:
        return
    batches, scan.pending = scan.pending, []
    n = ctx.h.l2_entries
    first_row = np.cumsum([0] + [len(b[1]) for b in batches])
    ent = np.concatenate([b[2][0] + first_row[i] * n for i, b in enumerate(batches)])  # rows stay distinct
    w0 = np.concatenate([b[2][1] for b in batches])
    bm = None if batches[0][2][2] is None else np.concatenate([b[2][2] for b in batches])
    fast = _sparse_l2_batch(ctx, ent, w0, bm, np.concatenate([b[1] for b in batches]), active=active)
    if fast is True:
        return
    for l1_indices, l2_offsets, (e, w, m) in batches:
        _check_entries(ctx, _Locator(ctx, l1_indices, l2_offsets, e // n, e % n, w, m, snapshot),
                       counted=fast == "copied", active=active)


def _check_tables(ctx: _Ctx, l1_indices: np.ndarray, l2_offsets: np.ndarray, raw: np.ndarray, *,
                  active: bool, snapshot: str | None) -> None:
    """Every rule for one dense batch (`raw`: its tables in file byte order; swapped in place here):
    the fast path where it covers the batch, else every rule over its non-zero entries."""
    w0, bm = _split(ctx, raw)
    fast = _fast_l2_batch(ctx, w0, bm, l2_offsets, active=active)
    if fast is True:
        return
    used = w0 != 0
    if bm is not None:
        used |= bm != 0
    tbl, idx = np.nonzero(used)  # row-major: L2 order
    _check_entries(ctx, _Locator(ctx, l1_indices, l2_offsets, tbl, idx, w0[tbl, idx],
                                 None if bm is None else bm[tbl, idx], snapshot),
                   counted=fast == "copied", active=active)


def _check_entries(ctx: _Ctx, loc: _Locator, *, counted: bool, active: bool) -> None:
    """Every rule of check_refcounts_l2 over the non-zero entries of some tables (an all-zero entry
    breaks no rule and counts nothing, so the work follows the entries in use, not the tables).
    `counted`: a fast path counted them already and only the COPIED findings are missing."""
    off = loc.w0 & _U64(C.L2E_OFFSET_MASK)
    if counted:
        comp = (loc.w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) != 0
        _copied_data(ctx, loc, off, ~comp & (off != 0))
        return
    first = len(ctx.findings)
    _full_l2_rules(ctx, loc, off, active=active)
    # in QEMU's order: entry by entry, not rule by rule
    ctx.findings[first:] = sorted(ctx.findings[first:], key=lambda f: (f.l1_index or 0, f.l2_index or 0))


def _full_l2_rules(ctx: _Ctx, loc: _Locator, off: np.ndarray, *, active: bool) -> None:
    """Every rule of check_refcounts_l2, for entries the fast paths do not cover.

    With an external data file (QEMU's has_data_file) data clusters live in the data file: they
    take no reference in the image's refcounts, offset 0 with COPIED is allocated, their refcount
    counts as 1 for the COPIED rule, and a compressed entry is an error of its own."""
    h, cs, cb = ctx.h, ctx.cs, ctx.cb
    ext = h.extended_l2
    external = h.has_data_file
    w0, bm = loc.w0, loc.bm
    comp = (w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) != 0
    has_off = ~comp & (off != 0)
    if external:
        has_off |= ~comp & (w0 >= _U64(C.QCOW_OFLAG_COPIED))
    alloc = bm & _U64(0xFFFFFFFF)
    zero = bm >> _U64(32)

    # reserved bits of standard descriptors
    for k in loc.where(~comp & ((w0 & _U64(C.L2E_STD_RESERVED_MASK)) != 0)):
        ctx.corruptions += 1
        ctx.add(loc.finding(k, FindingKind.L2_RESERVED_BITS, f"ERROR found l2 entry with reserved bits set: {loc.w(k):x}"))
    # compressed clusters
    x = 62 - (cb - 8)
    for k in loc.where(comp & ((w0 & _U64(C.QCOW_OFLAG_COPIED)) != 0)):
        ctx.corruptions += 1
        co = loc.w(k) & ((1 << x) - 1)
        ctx.add(loc.finding(k, FindingKind.COMPRESSED_COPIED,
                            f"ERROR: coffset=0x{co:x}: copied flag must never be set for compressed clusters",
                            host=co))
    dropped = comp  # (compressed entries meet none of the rules of unallocated ones)
    if external:
        for k in loc.where(comp):
            ctx.corruptions += 1
            ctx.add(loc.finding(k, FindingKind.COMPRESSED_DATA_FILE, f"ERROR compressed cluster {int(loc.idx[k])} "
                                f"with data file, entry=0x{loc.w(k) & ~C.QCOW_OFLAG_COPIED:x}",
                                host=loc.w(k) & ((1 << x) - 1)))
        comp = np.zeros_like(comp)  # (QEMU stops there: no other rule, not counted, no reference)
    comp_bad = comp & (bm != 0)
    for k in loc.where(comp_bad):
        ctx.corruptions += 1
        w = loc.w(k) & ~C.QCOW_OFLAG_COPIED
        ctx.add(loc.finding(k, FindingKind.COMPRESSED_BITMAP, f"ERROR compressed cluster {int(loc.idx[k])} with non-zero "
                            f"subcluster allocation bitmap, entry=0x{w:x}", host=loc.w(k) & ((1 << x) - 1),
                            subclusters=_bits(loc.b(k))))
    comp_ok = comp & (bm == 0)
    if comp_ok.any():
        cw = w0[comp_ok]
        coff = (cw & _U64((1 << x) - 1)).astype(np.int64)
        nsec = ((cw >> _U64(x)) & _U64((1 << (cb - 8)) - 1)).astype(np.int64) + 1
        ctx.inc(coff, nsec * 512 - (coff & 511), "compressed cluster")
    # allocated (normal / zero-alloc) clusters
    for k in loc.where(has_off & ((alloc & zero) != 0)):
        ctx.corruptions += 1
        ctx.add(loc.finding(k, FindingKind.INVALID_BITMAP_ALLOCATED, f"ERROR offset={loc.off(k):x}: Allocated cluster has "
                            "corrupted subcluster allocation bitmap", subclusters=_bits(loc.b(k) & (loc.b(k) >> 32))))
    unaligned = has_off & ((off & _U64(cs - 1)) != 0)
    if unaligned.any():
        data = (alloc != 0) if ext else ((w0 & _U64(C.QCOW_OFLAG_ZERO)) == 0)
        for k in loc.where(unaligned):
            ctx.corruptions += 1
            if data[k]:
                ctx.add(loc.finding(k, FindingKind.DATA_CLUSTER_UNALIGNED, f"ERROR offset={loc.off(k):x}: Data cluster is "
                                    "not properly aligned; L2 entry corrupted."))
            else:
                ctx.add(loc.finding(k, FindingKind.PREALLOC_CLUSTER_UNALIGNED, f"ERROR offset={loc.off(k):x}: Preallocated "
                                    "cluster is not properly aligned; L2 entry corrupted.", repairable=True))
    if not external:
        ctx.inc(off[has_off].astype(np.int64), cs, "data cluster")
    if ext:
        for k in loc.where(~dropped & ~has_off & (alloc != 0)):
            ctx.corruptions += 1
            ctx.add(loc.finding(k, FindingKind.INVALID_BITMAP_UNALLOCATED,
                                "ERROR: Unallocated cluster has non-zero subcluster allocation map",
                                subclusters=_bits(loc.b(k) & 0xFFFFFFFF)))
    if not active:
        return
    # fragmentation info, per L2 table as QEMU counts it
    nc = int(comp_ok.sum())
    ctx.compressed += nc
    ctx.allocated += nc + int(has_off.sum())
    ctx.fragmented += nc + _fragmented(loc.tbl[has_off], off[has_off], cs)
    _copied_data(ctx, loc, off, has_off)


def _copied_data(ctx: _Ctx, loc: _Locator, off: np.ndarray, has_off: np.ndarray) -> None:
    """check_oflag_copied for data clusters: COPIED set exactly when the on-disk refcount is 1."""
    cb = ctx.cb
    usable = ctx.readable(loc.l2o >> cb) & (loc.l2o != 0)  # QEMU skips a table at offset 0 here
    ks = np.flatnonzero(has_off & usable[loc.tbl])
    if ks.size:
        clusters = (off[ks] >> _U64(cb)).astype(np.int64)
        copied = (loc.w0[ks] & _U64(C.QCOW_OFLAG_COPIED)) != 0
        if ctx.h.has_data_file:  # data clusters in an external data file: refcount 1, always
            wrong = np.flatnonzero(~copied)
            rc = np.ones(len(wrong), dtype=np.int64)
        else:
            one, ok = ctx.is_one(clusters)
            wrong = np.flatnonzero(ok & (one != copied))
            rc, _ok = ctx.ondisk(clusters[wrong])
        for k, r in zip(ks[wrong].tolist(), rc.tolist()):
            ctx.corruptions += 1
            ctx.add(loc.finding(k, FindingKind.COPIED_DATA, f"ERROR OFLAG_COPIED data cluster: l2_entry={loc.w(k):x} "
                                f"refcount={r}", repairable=True, refcount=r), copied=True)


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(32) if mask >> i & 1)


class _Locator:
    """Some L2 entries of a batch of tables, in L2 order, and located Findings for them: entry k
    is index `idx[k]` of table `tbl[k]` (a row of `l1i` / `l2o`), with words `w0[k]`, `bm[k]`."""

    def __init__(self, ctx, l1_indices, l2_offsets, tbl, idx, w0, bm, snapshot):
        self.ctx, self.l1i, self.l2o, self.snapshot = ctx, l1_indices, l2_offsets, snapshot
        self.tbl, self.idx, self.w0 = tbl, idx, w0
        self.bm = np.zeros_like(w0) if bm is None else bm

    @staticmethod
    def where(mask: np.ndarray) -> list[int]:
        return np.flatnonzero(mask).tolist() if mask.any() else []

    def w(self, k: int) -> int:
        return int(self.w0[k])

    def b(self, k: int) -> int:
        return int(self.bm[k])

    def off(self, k: int) -> int:
        return self.w(k) & C.L2E_OFFSET_MASK

    def finding(self, k, kind, message, *, host=None, subclusters=(), repairable=False, refcount=None):
        h = self.ctx.h
        t, i = int(self.tbl[k]), int(self.idx[k])
        l1 = int(self.l1i[t])
        return Finding(kind, Severity.ERROR, message, l1_index=l1, l2_index=i,
                       guest_offset=(l1 * h.l2_entries + i) << h.cluster_bits,
                       host_offset=self.off(k) if host is None else host, subclusters=tuple(subclusters),
                       repairable_by_qemu=repairable, snapshot=self.snapshot, entry=self.w(k),
                       bitmap=self.b(k) if h.extended_l2 else None, l2_offset=int(self.l2o[t]), refcount=refcount)


# ---- snapshots and bitmaps ---------------------------------------------------------------------
def _snapshots(ctx: _Ctx) -> None:
    img, h = ctx.img, ctx.h
    if not h.nb_snapshots:
        return
    snaps = img.snapshots()
    for sn in snaps:
        if sn.l1_table_offset % ctx.cs:
            ctx.corruptions += 1
            ctx.add(Finding(FindingKind.SNAPSHOT_L1_UNALIGNED, Severity.ERROR,
                            f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: L1 table is not "
                            "cluster aligned; snapshot table entry corrupted", host_offset=sn.l1_table_offset,
                            snapshot=sn.id))
            continue
        if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
            ctx.corruptions += 1
            ctx.add(Finding(FindingKind.SNAPSHOT_L1_TOO_LARGE, Severity.ERROR,
                            f"ERROR snapshot {sn.id} ({sn.name}) l1_size={sn.l1_size:#x}: L1 table is too large; "
                            "snapshot table entry corrupted", snapshot=sn.id))
            continue
        _walk_l1(ctx, sn.l1_table_offset, sn.l1_size, active=False, snapshot=sn.id)
    last = snaps[-1]
    id_len, name_len = struct.unpack_from(">HH", img.pread(last.offset + 12, 4))
    extra = struct.unpack_from(">I", img.pread(last.offset + 36, 4))[0]
    end = last.offset + 40 + extra + id_len + name_len  # QEMU's snapshots_size stops before the last padding
    ctx.inc_region(h.snapshots_offset, end - h.snapshots_offset)


def _bitmaps(ctx: _Ctx) -> None:
    """qcow2_check_bitmaps_refcounts: directory, bitmap tables and their data clusters."""
    ext = bitmaps_extension(ctx.h)
    if ext is None:
        return  # HX: QEMU ignores the extension without the autoclear bit (its sizes are unchecked)
    nb, dir_size, dir_off = ext
    if nb == 0:
        return
    ctx.inc_region(dir_off, dir_size)
    entries, truncated = directory_entries(ctx.img.pread(dir_off, dir_size), nb)
    for e in entries:
        # QEMU refuses to open the image (so to check it) when a directory entry breaks these
        if e.type != 1 or not 9 <= e.granularity_bits <= 31 or e.flags & ~0x3 or not e.name_size or \
                e.table_offset % ctx.cs or (e.table_size and not e.table_offset):
            raise CorruptImage(f"Bitmap '{e.name}' doesn't satisfy the constraints (bitmap directory at 0x{dir_off:x})")
        ctx.inc_region(e.table_offset, e.table_size * 8)
        table = ctx.u64s(e.table_offset, e.table_size).astype(np.uint64) if e.table_size else np.zeros(0, np.uint64)
        offs = table & _U64(BME_TABLE_ENTRY_OFFSET_MASK)
        bad = ((table & _U64(BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
            (offs != 0) & (((table & _U64(BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0) | ((offs % _U64(ctx.cs)) != 0)))
        for i in np.flatnonzero(bad).tolist():
            ctx.corruptions += 1
            ctx.add(Finding(FindingKind.BITMAP_TABLE_ENTRY, Severity.ERROR, f"ERROR bitmap table entry {i} is invalid: "
                            f"{int(table[i]):x}", host_offset=int(offs[i])))
        good = ~bad & (offs != 0)
        ctx.inc(offs[good].astype(np.int64), ctx.cs, "bitmap data")
    if truncated:
        ctx.corruptions += 1
        ctx.add(Finding(FindingKind.BITMAP_DIRECTORY, Severity.ERROR, "ERROR bitmap directory is truncated",
                        host_offset=dir_off))


# ---- refcount structure -----------------------------------------------------------------------
def _refblocks(ctx: _Ctx) -> None:
    """check_refblocks: every refcount table entry is an aligned, in-file block referenced once.
    Only the table's non-zero entries are looked at (a zero entry breaks no rule); `slot` is their
    index in the table."""
    full = ctx.img.reftable
    slot = np.flatnonzero(full)
    rt = full[slot].astype(np.uint64)
    cs = ctx.cs
    offs = (rt & _U64(C.REFT_OFFSET_MASK)).astype(np.int64)
    reserved = (rt & _U64(C.REFT_RESERVED_MASK)) != 0
    unaligned = ~reserved & (offs % cs != 0)
    for j in np.flatnonzero(reserved).tolist():
        ctx.corruptions += 1
        ctx.rebuild = True
        ctx.add(Finding(FindingKind.REFTABLE_RESERVED_BITS, Severity.ERROR, f"ERROR refcount table entry {int(slot[j])} has reserved "
                        "bits set", host_offset=int(offs[j]), entry=int(rt[j])))
    for j in np.flatnonzero(unaligned).tolist():
        ctx.corruptions += 1
        ctx.rebuild = True
        ctx.add(Finding(FindingKind.REFBLOCK_UNALIGNED, Severity.ERROR,
                        f"ERROR refcount block {int(slot[j])} is not cluster aligned; refcount table entry corrupted",
                        host_offset=int(offs[j]), entry=int(rt[j])))
    ok = ~reserved & ~unaligned
    clusters = offs >> ctx.cb
    outside = ok & ((offs < 0) | (clusters >= len(ctx.refs)))  # HX: bit 63 set reads as negative int64
    for j in np.flatnonzero(outside).tolist():
        ctx.corruptions += 1
        ctx.add(Finding(FindingKind.REFBLOCK_OUTSIDE_IMAGE, Severity.ERROR, f"ERROR refcount block {int(slot[j])} is outside image",
                        host_offset=int(offs[j]), repairable_by_qemu=True))
    sel = np.flatnonzero(ok & ~outside & (offs != 0))
    if sel.size == 0:
        return
    cl = clusters[sel]
    base = ctx.refs[cl].astype(np.int64)
    # value seen right after each block's own increment: earlier references + earlier blocks on it + 1
    if len(set(cl.tolist())) == len(cl):  # the usual case: each block in its own cluster
        seen = np.ones(len(cl), dtype=np.int64)
    else:
        order = np.argsort(cl, kind="stable")
        scl = cl[order]
        first = np.r_[0, np.flatnonzero(scl[1:] != scl[:-1]) + 1]
        rank = np.arange(len(scl)) - np.repeat(first, np.diff(np.r_[first, len(scl)]))
        seen = np.empty_like(rank)
        seen[order] = rank + 1
    value = np.minimum(base + seen, ctx.refmax)
    ctx.inc(offs[sel], cs, "refcount block")
    for k in np.flatnonzero(value != 1).tolist():
        ctx.corruptions += 1
        ctx.rebuild = True
        ctx.add(Finding(FindingKind.REFBLOCK_REFCOUNT, Severity.ERROR, f"ERROR refcount block {int(slot[sel[k]])} "
                        f"refcount={int(value[k])}", host_offset=int(offs[sel[k]]), cluster=int(cl[k]),
                        reference=int(value[k])))


def _overflow(ctx: _Ctx) -> None:
    """References beyond the refcount width: each one QEMU could not add is a corruption."""
    if ctx.refmax >= (1 << 62) or not ctx.refs.size or int(ctx.refs.max()) <= ctx.refmax:
        return
    over = np.flatnonzero(ctx.refs > ctx.refmax)
    for c in over.tolist():
        extra = int(ctx.refs[c]) - ctx.refmax
        ctx.corruptions += extra
        for _ in range(min(extra, 10)):
            ctx.add(Finding(FindingKind.REFCOUNT_OVERFLOW, Severity.ERROR, f"ERROR: overflow cluster offset=0x{c * ctx.cs:x}",
                            host_offset=c * ctx.cs, cluster=c))
    if over.size:
        np.minimum(ctx.refs, ctx.refmax, out=ctx.refs)


def _compare(ctx: _Ctx) -> tuple[int, int]:
    """compare_refcounts, in QEMU's order, one refcount block at a time (its on-disk values read
    again here, so no whole-file array of them is ever held): (leaks, highest cluster in use);
    corruptions and check errors are counted in ctx."""
    nb = len(ctx.refs)
    per = ctx.h.refcount_block_entries
    leaks = highest = 0
    for blk in range(-(-nb // per)):
        lo, hi = blk * per, min(nb, (blk + 1) * per)
        have = ctx.block_raw(blk)
        if have is None:  # QEMU: EIO, skipped even for the image end offset
            ctx.check_errors += hi - lo
            for c in range(lo, hi):
                ctx.add(Finding(FindingKind.REFCOUNT_UNREADABLE, Severity.ERROR, f"Can't get refcount for cluster "
                                f"{c}: Input/output error", cluster=c, host_offset=c * ctx.cs))
            continue
        have, want = have[:hi - lo], ctx.refs[lo:hi]
        used = np.flatnonzero((have != 0) | (want != 0))
        if used.size:
            highest = lo + int(used[-1])
        d = np.flatnonzero(have != want)
        if d.size:
            leaks += _mismatches(ctx, d + lo, have[d], want[d])
    return leaks, highest


def _mismatches(ctx: _Ctx, clusters: np.ndarray, have: np.ndarray, want: np.ndarray) -> int:
    """Report refcount != references for these clusters; returns the number of leaks."""
    leaks = 0
    for c, r1, r2 in zip(clusters.tolist(), have.tolist(), want.tolist()):
        if r1 == 0:
            ctx.rebuild = True
        if r1 < r2:
            ctx.corruptions += 1
            ctx.add(Finding(FindingKind.REFCOUNT_TOO_LOW if r1 else FindingKind.REFCOUNT_ZERO, Severity.ERROR,
                            f"ERROR cluster {c} refcount={r1} reference={r2}", cluster=c, host_offset=c * ctx.cs,
                            refcount=r1, reference=r2, repairable_by_qemu=True))
        else:
            leaks += 1
            ctx.add(Finding(FindingKind.LEAK, Severity.LEAK, f"Leaked cluster {c} refcount={r1} reference={r2}", cluster=c,
                            host_offset=c * ctx.cs, refcount=r1, reference=r2, repairable_by_qemu=True))
    return leaks


_MALLOC_TUNED = False


def _reuse_freed_memory() -> None:
    """Each batch of L2 tables makes a few MiB of numpy temporaries. glibc maps blocks above 128 KiB
    afresh and gives freed heap above 128 KiB back at once (unless a bigger block freed earlier
    raised both limits), so every batch faulted its temporaries in again: on a 1 TiB image 255k
    page faults, half the time. Blocks up to 4 MiB come from the heap and up to 16 MiB of freed
    heap is kept; peak memory is unchanged (the temporaries are bounded). glibc only; once."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 4 << 20)
    mallopt(M_TRIM_THRESHOLD, 16 << 20)


def check_image(img: Image, *, progress=None) -> CheckReport:
    """Check `img` as `qemu-img check` (no repair) does; counts equal qemu-img's."""
    _reuse_freed_memory()
    ctx = _Ctx(img, progress)
    h = ctx.h
    info: list[Finding] = []
    if h.is_dirty:
        info.append(Finding(FindingKind.DIRTY_BIT, Severity.INFO, "the dirty bit is set: refcounts may be stale (lazy refcounts)"))
    if h.is_corrupt:
        info.append(Finding(FindingKind.CORRUPT_BIT, Severity.INFO, "the corrupt bit is set: QEMU refuses to open the image "
                            "read-write until a repair clears it"))
    outside = backing_warning(img.path, h.backing_file)
    if outside:
        info.append(Finding(FindingKind.BACKING_OUTSIDE_DIRECTORY, Severity.INFO, outside))
    try:
        ctx.inc_region(0, ctx.cs)
        _walk_l1(ctx, h.l1_table_offset, h.l1_size, active=True, snapshot=None)
        _snapshots(ctx)
        ctx.inc_region(h.refcount_table_offset, h.refcount_table_clusters * ctx.cs)
        _bitmaps(ctx)
        _refblocks(ctx)
    except QcowError as e:
        ctx.check_errors += 1
        ctx.add(Finding(FindingKind.CHECK_FAILED, Severity.ERROR, f"check could not complete: {e}"))
        return _report(ctx, info, leaks=0, highest=-1)
    _overflow(ctx)
    leaks, highest = _compare(ctx)
    return _report(ctx, info, leaks=leaks, highest=highest)


def _report(ctx: _Ctx, info: list[Finding], *, leaks: int, highest: int) -> CheckReport:
    h = ctx.h
    findings = info + ctx.findings + ctx.copied
    for kind, n in ctx.kind_counts.items():
        if n > MAX_FINDINGS_PER_KIND:
            findings.append(Finding(FindingKind.TRUNCATED, Severity.INFO, f"... {n - MAX_FINDINGS_PER_KIND} more '{kind.value}' findings "
                                    "not listed"))
    return CheckReport(
        filename=ctx.img.path, check_errors=ctx.check_errors, corruptions=ctx.corruptions, leaks=leaks,
        image_end_offset=(highest + 1) * ctx.cs if highest >= 0 else 0,
        total_clusters=-(-ctx.img.size // ctx.cs), allocated_clusters=ctx.allocated,
        fragmented_clusters=ctx.fragmented, compressed_clusters=ctx.compressed, findings=tuple(findings),
        rebuild_needed=ctx.rebuild, references=ctx.refs,
        unlisted=sum(n - MAX_FINDINGS_PER_KIND for n in ctx.kind_counts.values() if n > MAX_FINDINGS_PER_KIND))
