"""Subcluster classification (QEMU's qcow2_get_subcluster_type), range masks and bitmap strings.

Everything here works on whole arrays of L2 entries at once: `word0` and `bitmap` are uint64
arrays (views of an L2 table, or any selection of entries). Standard (non-extended) images are
handled as one "subcluster" per cluster, with the v3 zero flag (bit 0) playing the zero bit.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

import numpy as np

from . import constants as C


class SubclusterType(IntEnum):
    """QEMU's QCow2SubclusterType, same names and order."""

    UNALLOCATED_PLAIN = 0
    UNALLOCATED_ALLOC = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    NORMAL = 4
    COMPRESSED = 5
    INVALID = 6


T = SubclusterType
# The same kinds as plain ints, for the scalar functions below and the write path that calls them
# for every subcluster range it looks at: compiled, an int compares in one instruction, an enum
# member is an attribute lookup and a rich comparison. (An IntEnum equals its int.)
UNALLOCATED_PLAIN: Final = 0
UNALLOCATED_ALLOC: Final = 1
ZERO_PLAIN: Final = 2
ZERO_ALLOC: Final = 3
NORMAL: Final = 4
COMPRESSED: Final = 5
INVALID: Final = 6
ALLOC_TYPES = (T.NORMAL, T.ZERO_ALLOC, T.UNALLOCATED_ALLOC)
TYPE_CHARS = "--00NC!"  # indexed by SubclusterType
TYPE_CHAR_LUT = np.frombuffer(TYPE_CHARS.encode(), dtype=np.uint8)

_U64 = np.uint64
_LOW32 = _U64(0xFFFFFFFF)
_SC_SHIFTS = np.arange(32, dtype=np.uint64)


# ---- masks (qcow2.h SUB_ALLOC / SUB_ZERO and their ranges) --------------------------------------
def sub_alloc_range(x: int, y: int) -> int:
    """Allocation bits of subclusters x..y-1 (0 <= x <= y <= 32)."""
    return (1 << y) - (1 << x)


def ctz32(v: int) -> int:
    v &= 0xFFFFFFFF
    return 32 if v == 0 else (v & -v).bit_length() - 1


def clz32(v: int) -> int:
    v &= 0xFFFFFFFF
    return 32 - v.bit_length()


# ---- classification ------------------------------------------------------------------------------
def cluster_flags(word0: np.ndarray, bitmap: np.ndarray | None, *, extended: bool, data_file: bool = False):
    """(compressed, allocated, invalid) boolean arrays for a set of L2 entries.

    `allocated` means a host offset is present in word 0 (QEMU's "offset != 0" test), or, in an
    image with an external data file (`data_file`), offset 0 with COPIED (0 is a place there).
    `invalid` follows the whole-bitmap rule: any subcluster with both bits in an allocated
    cluster, or any allocation bit in an unallocated one, makes every subcluster INVALID.
    """
    w0 = np.asarray(word0, dtype=np.uint64)
    compressed = (w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) != 0
    allocated = ((w0 & _U64(C.L2E_OFFSET_MASK)) != 0) & ~compressed
    if data_file:
        allocated |= (w0 >= _U64(C.QCOW_OFLAG_COPIED)) & ~compressed
    if not extended or bitmap is None:
        return compressed, allocated, np.zeros(w0.shape, dtype=bool)
    bm = np.asarray(bitmap, dtype=np.uint64)
    a = bm & _LOW32
    z = bm >> _U64(32)
    invalid = ~compressed & np.where(allocated, (a & z) != 0, a != 0)
    return compressed, allocated, invalid


def classify(word0: np.ndarray, bitmap: np.ndarray | None, *, extended: bool, data_file: bool = False) -> np.ndarray:
    """Per-subcluster types, shape (n, 32) for extended L2 or (n, 1) for standard L2, uint8."""
    w0 = np.asarray(word0, dtype=np.uint64)
    compressed, allocated, invalid = cluster_flags(w0, bitmap, extended=extended, data_file=data_file)
    if not extended or bitmap is None:
        zero = (w0 & _U64(C.QCOW_OFLAG_ZERO)) != 0
        t = np.where(allocated, np.where(zero, T.ZERO_ALLOC, T.NORMAL),
                     np.where(zero, T.ZERO_PLAIN, T.UNALLOCATED_PLAIN)).astype(np.uint8)
        t[compressed] = T.COMPRESSED
        return t[:, None]
    bm = np.asarray(bitmap, dtype=np.uint64)
    a = ((bm[:, None] >> _SC_SHIFTS) & _U64(1)).astype(bool)
    z = ((bm[:, None] >> (_SC_SHIFTS + _U64(32))) & _U64(1)).astype(bool)
    al = allocated[:, None]
    t = np.where(z, np.where(al, T.ZERO_ALLOC, T.ZERO_PLAIN),
                 np.where(a, T.NORMAL, np.where(al, T.UNALLOCATED_ALLOC, T.UNALLOCATED_PLAIN))).astype(np.uint8)
    t[compressed] = T.COMPRESSED
    t[invalid] = T.INVALID
    return t


def popcount64(v: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(v, dtype=np.uint64)).astype(np.int64)


def type_counts(word0: np.ndarray, bitmap: np.ndarray | None, *, extended: bool) -> np.ndarray:
    """Number of subclusters of each SubclusterType among the entries (length-7 int64 array).

    Uses popcounts of the bitmap halves instead of expanding to (n, 32): whole-image counts of a
    1 TiB image touch 16M entries, not 537M subclusters.
    """
    counts = np.zeros(len(SubclusterType), dtype=np.int64)
    w0 = np.asarray(word0, dtype=np.uint64)
    if not extended or bitmap is None:
        t = classify(w0, None, extended=False)[:, 0]
        return np.bincount(t, minlength=len(SubclusterType)).astype(np.int64)
    compressed, allocated, invalid = cluster_flags(w0, bitmap, extended=True)
    bm = np.asarray(bitmap, dtype=np.uint64)
    ok = ~compressed & ~invalid
    na = popcount64(bm & _LOW32)
    nz = popcount64(bm >> _U64(32))
    alloc_ok = ok & allocated
    plain_ok = ok & ~allocated
    counts[T.COMPRESSED] = 32 * int(compressed.sum())
    counts[T.INVALID] = 32 * int(invalid.sum())
    counts[T.NORMAL] = int(na[alloc_ok].sum())
    counts[T.ZERO_ALLOC] = int(nz[alloc_ok].sum())
    counts[T.UNALLOCATED_ALLOC] = int((32 - na - nz)[alloc_ok].sum())
    counts[T.ZERO_PLAIN] = int(nz[plain_ok].sum())
    counts[T.UNALLOCATED_PLAIN] = int((32 - nz)[plain_ok].sum())
    return counts


def subcluster_type(word0: int, bitmap: int, sc: int, *, extended: bool) -> int:
    """Scalar classification of one subcluster (for planners and inspectors): a SubclusterType
    value as a plain int (`SubclusterType(kind)` names it)."""
    if word0 & C.QCOW_OFLAG_COMPRESSED:
        return COMPRESSED
    allocated = (word0 & C.L2E_OFFSET_MASK) != 0
    if not extended:
        zero = (word0 & C.QCOW_OFLAG_ZERO) != 0
        if allocated:
            return ZERO_ALLOC if zero else NORMAL
        return ZERO_PLAIN if zero else UNALLOCATED_PLAIN
    a, z = bitmap & 0xFFFFFFFF, bitmap >> 32
    if allocated:
        if a & z:
            return INVALID
        return ZERO_ALLOC if z >> sc & 1 else NORMAL if a >> sc & 1 else UNALLOCATED_ALLOC
    if a:
        return INVALID
    return ZERO_PLAIN if z >> sc & 1 else UNALLOCATED_PLAIN


def subcluster_range_type(word0: int, bitmap: int, sc_from: int, *, extended: bool) -> tuple[int, int]:
    """QEMU's qcow2_get_subcluster_range_type: the type at sc_from (as subcluster_type) and how
    many subclusters from sc_from on share it within this cluster."""
    if not word0 and not bitmap:  # an empty entry: the usual case on a fresh image
        return UNALLOCATED_PLAIN, (32 - sc_from if extended else 1)
    t = subcluster_type(word0, bitmap, sc_from, extended=extended)
    if not extended:
        return t, 1
    if t == INVALID or t == COMPRESSED:
        return t, 32 - sc_from
    low = (1 << sc_from) - 1
    if t == NORMAL:
        v = (bitmap & 0xFFFFFFFF) | low
        return t, _cto32(v) - sc_from
    if t == ZERO_PLAIN or t == ZERO_ALLOC:
        v = (bitmap >> 32) | low
        return t, _cto32(v) - sc_from
    v = ((bitmap >> 32) | bitmap) & 0xFFFFFFFF & ~low
    return t, ctz32(v) - sc_from


def _cto32(v: int) -> int:
    return ctz32(~v & 0xFFFFFFFF)


# ---- bitmap strings --------------------------------------------------------------------------------
def bitmap_strings(types: np.ndarray) -> list[str]:
    """`--0-NN-0_NNNNNNNN_NNNNNNNN_NNNNNNNN` for each row of a classify() result."""
    chars = TYPE_CHAR_LUT[types]
    if types.shape[1] != 32:
        return [bytes(row).decode() for row in chars]
    sep = np.full((chars.shape[0], 1), ord("_"), dtype=np.uint8)
    full = np.concatenate([chars[:, 0:8], sep, chars[:, 8:16], sep, chars[:, 16:24], sep, chars[:, 24:32]], axis=1)
    return [bytes(row).decode() for row in full]


def bitmap_string(word0: int, bitmap: int, *, extended: bool = True) -> str:
    t = classify(np.array([word0], dtype=np.uint64), np.array([bitmap], dtype=np.uint64) if extended else None,
                 extended=extended)
    return bitmap_strings(t)[0]


_BYTE_CHARS: dict[tuple[int, int], str] = {}


def _byte_chars(a: int, z: int, allocated: bool) -> str:
    """8 subcluster characters for one byte of the allocation and zero halves (memoised)."""
    key = (a | z << 8, allocated)
    s = _BYTE_CHARS.get(key)
    if s is None:
        s = _BYTE_CHARS[key] = "".join("0" if z >> i & 1 else "N" if a >> i & 1 else "-" for i in range(8))
    return s


_STRINGS: dict[tuple[int, bool], str] = {}


def fast_bitmap_string(word0: int, bitmap: int, ext: bool) -> str:
    """Same text as bitmap_string, without numpy (memoised per bitmap: most repeat). For the write
    path, which formats the bitmaps of a few clusters per step."""
    if not ext or word0 & C.QCOW_OFLAG_COMPRESSED:
        return bitmap_string(word0, bitmap, extended=ext)
    allocated = bool(word0 & C.L2E_OFFSET_MASK)
    key = (bitmap, allocated)
    s = _STRINGS.get(key)
    if s is not None:
        return s
    a, z = bitmap & 0xFFFFFFFF, bitmap >> 32
    if (a & z) if allocated else a:
        return bitmap_string(word0, bitmap, extended=True)
    s = "_".join([_byte_chars(a >> k & 0xFF, z >> k & 0xFF, allocated) for k in (0, 8, 16, 24)])
    if len(_STRINGS) > 65536:
        _STRINGS.clear()
    _STRINGS[key] = s
    return s
