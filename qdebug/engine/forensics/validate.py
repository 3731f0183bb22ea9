"""Which L1 and L2 entries could have been written by QEMU, vectorized over whole tables.

An entry is *impossible* when no QEMU writes it: reserved bits set, a host offset not cluster
aligned, an invalid subcluster bitmap, a compressed descriptor with COPIED or a bitmap, a host
cluster mapped twice in one table, a pointer at the header. Impossible entries are what tells a
real table from something else written over it (a refcount block, garbage, another table's
copy). An entry can also be *unusable* without being impossible: its data lies past the end of
the file (a truncated file), points into metadata or at another entry's cluster; those are
decided with the whole image in view (salvage.py). Each verdict carries a reason code (`Reason`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from ..format import constants as C

_U64 = np.uint64


class Reason(IntEnum):
    """Why guest bytes are lost (0: they are not). Texts in `REASON_TEXT`."""

    NONE = 0
    ENTRY_RESERVED = 1
    ENTRY_UNALIGNED = 2
    ENTRY_BITMAP = 3
    ENTRY_COMPRESSED_FLAGS = 4
    ENTRY_DUPLICATE = 5  # (a whole table's verdict: see L2Verdict.dup_excess)
    ENTRY_HEADER = 6
    DATA_PAST_EOF = 7
    INTO_METADATA = 8
    CONFLICT = 9
    COMPRESSED_PAST_EOF = 10
    COMPRESSED_BAD = 11
    TABLE_REJECTED = 12
    TABLE_ZEROS = 13
    TABLE_PAST_EOF = 14
    TABLE_CONFLICT = 15
    L1_ENTRY_BAD = 16
    L1_UNKNOWN = 17
    L1_SHORT = 18
    ORPHAN_SLOT = 19
    BACKING = 20  # the text names the backing file and what is wrong with it


REASON_TEXT = {
    Reason.ENTRY_RESERVED: "L2 entry with reserved bits set",
    Reason.ENTRY_UNALIGNED: "L2 entry whose host offset is not cluster aligned",
    Reason.ENTRY_BITMAP: "L2 entry with an invalid subcluster bitmap",
    Reason.ENTRY_COMPRESSED_FLAGS: "compressed L2 entry with COPIED or bitmap bits set",
    Reason.ENTRY_DUPLICATE: "L2 entry mapping a host cluster another entry of its table maps",
    Reason.ENTRY_HEADER: "L2 entry pointing at the header cluster",
    Reason.DATA_PAST_EOF: "data past the end of the file (truncated file?)",
    Reason.INTO_METADATA: "L2 entry pointing into metadata",
    Reason.CONFLICT: "host cluster mapped by two guest clusters (which one owns it is unknown)",
    Reason.COMPRESSED_PAST_EOF: "compressed data past the end of the file (truncated file?)",
    Reason.COMPRESSED_BAD: "compressed cluster that does not decompress",
    Reason.TABLE_REJECTED: "its L2 table failed validation (not an L2 table: overwritten?)",
    Reason.TABLE_ZEROS: "its L2 table reads as all zeros while unreferenced guest data exists (its entries may be lost)",
    Reason.TABLE_PAST_EOF: "its L2 table lies past the end of the file (truncated file?)",
    Reason.TABLE_CONFLICT: "its L2 table is also another structure's cluster, or shares data clusters with "
                           "another table (a copy written over it?)",
    Reason.L1_ENTRY_BAD: "its L1 entry is invalid (reserved bits, unaligned, or pointing at the header)",
    Reason.L1_UNKNOWN: "the L1 table is unknown (the header's L1 offset is invalid and none was found by content)",
    Reason.L1_SHORT: "beyond the end of the L1 table (l1_size too small for the virtual size)",
    Reason.ORPHAN_SLOT: "no L2 table here, but an orphaned L2 table that may belong here could not be placed",
}


@dataclass(frozen=True)
class L2Verdict:
    """Per entry of one or more tables (arrays shaped like the entries)."""

    reason: np.ndarray  # uint8 Reason of impossible entries, 0 elsewhere
    host: np.ndarray  # int64 host cluster index of entries with a host cluster (-1 otherwise)
    comp: np.ndarray  # bool compressed
    coff: np.ndarray  # int64 compressed byte offset (compressed entries)
    nbytes: np.ndarray  # int64 compressed bytes to read (compressed entries)
    used: np.ndarray  # bool entry not all zero
    dup_excess: np.ndarray  # per table: entries mapping a host cluster beyond the first two that share one

    @property
    def impossible(self) -> np.ndarray:
        return self.reason != 0


def l2_verdict(w0: np.ndarray, bm: np.ndarray | None, *, cluster_bits: int) -> L2Verdict:
    """Verdicts for L2 entries (native words; `w0`, `bm` shaped (tables, entries) or flat)."""
    cs = 1 << cluster_bits
    reason = np.zeros(w0.shape, dtype=np.uint8)
    comp = (w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) != 0
    off = (w0 & _U64(C.L2E_OFFSET_MASK)).astype(np.int64)
    has = ~comp & (off != 0)
    used = (w0 != 0) if bm is None else ((w0 != 0) | (bm != 0))

    def mark(mask: np.ndarray, why: Reason) -> None:
        reason[mask & (reason == 0)] = why

    mark(~comp & ((w0 & _U64(C.L2E_STD_RESERVED_MASK)) != 0), Reason.ENTRY_RESERVED)
    mark(has & ((off & (cs - 1)) != 0), Reason.ENTRY_UNALIGNED)
    mark(has & (off < cs), Reason.ENTRY_HEADER)
    if bm is not None:
        a, z = bm & _U64(0xFFFFFFFF), bm >> _U64(32)
        mark(~comp & np.where(has, (a & z) != 0, a != 0), Reason.ENTRY_BITMAP)
        mark(comp & (bm != 0), Reason.ENTRY_COMPRESSED_FLAGS)
    mark(comp & ((w0 & _U64(C.QCOW_OFLAG_COPIED)) != 0), Reason.ENTRY_COMPRESSED_FLAGS)
    host = np.where(has & ((off & (cs - 1)) == 0), off >> cluster_bits, -1)
    x = 62 - (cluster_bits - 8)
    coff = np.where(comp, (w0 & _U64((1 << x) - 1)).astype(np.int64), 0)
    nsec = ((w0 >> _U64(x)) & _U64((1 << (cluster_bits - 8)) - 1)).astype(np.int64) + 1
    nbytes = np.where(comp, nsec * 512 - (coff & 511), 0)
    mark(comp & (coff < cs), Reason.ENTRY_HEADER)
    # one host cluster twice in one table: one such pair is a double reference (both entries are
    # lost, salvage.py), more is a table that is not one (a refcount block repeats its values)
    rows = host.reshape(-1, host.shape[-1]) if host.ndim > 1 else host.reshape(1, -1)
    srt = np.sort(rows, axis=1)
    same = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    excess = np.maximum(same.sum(axis=1) - 1, 0)
    return L2Verdict(reason, host, comp, coff, nbytes, used, excess)


def table_rejected(impossible: int, used: int) -> bool:
    """A table is not an L2 table when two of its entries are impossible, or one among few: a
    single flipped entry in a busy table is that entry's loss, not the table's."""
    return impossible >= 2 or (impossible == 1 and used <= 16)


def l1_rejected(impossible: int, used: int) -> bool:
    """An L1 table has few entries: it is not one when most of them are impossible."""
    return impossible > max(1, used // 2)


def l1_verdict(l1: np.ndarray, *, cluster_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, reason) for native L1 entries: reason L1_ENTRY_BAD where impossible."""
    cs = 1 << cluster_bits
    off = (l1 & _U64(C.L1E_OFFSET_MASK)).astype(np.int64)
    bad = (l1 != 0) & (((l1 & _U64(C.L1E_RESERVED_MASK)) != 0) | ((off & (cs - 1)) != 0) | (off < cs))
    return off, np.where(bad, Reason.L1_ENTRY_BAD, Reason.NONE).astype(np.uint8)
