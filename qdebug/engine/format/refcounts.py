"""Refcount entries of every width (refcount_order 0..6): packing, reading and setting one entry.

Widths of 8 bits and more are big-endian integers; 1, 2 and 4-bit entries are packed from the
least-significant bit of each byte (qcow2.txt "Host cluster management"). Setting goes through
`Image.pwrite`, so the undo journal sees it; the refcount block must already exist (growing the
refcount structures is the allocator's job).
"""

from __future__ import annotations

import numpy as np

from . import constants as C

_BIG = {3: np.dtype("u1"), 4: np.dtype(">u2"), 5: np.dtype(">u4"), 6: np.dtype(">u8")}


def _check_order(order: int) -> None:
    if not 0 <= order <= C.MAX_REFCOUNT_ORDER:
        raise ValueError(f"refcount_order {order} is outside 0..6")


def pack_refcounts(values: np.ndarray, order: int) -> bytes:
    """Refcount values -> on-disk bytes (len(values) * 2**order bits, whole bytes)."""
    _check_order(order)
    v = np.asarray(values, dtype=np.uint64)
    bits = 1 << order
    if bits < 64 and v.size and int(v.max()) >> bits:
        raise ValueError(f"refcount {int(v.max())} does not fit in {bits} bits")
    if order >= 3:
        return v.astype(_BIG[order]).tobytes()
    per = 8 // bits
    if v.size % per:
        raise ValueError(f"{v.size} refcounts of {bits} bits do not fill whole bytes")
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
    packed = (v.reshape(-1, per) << shifts).sum(axis=1, dtype=np.uint64)
    return packed.astype(np.uint8).tobytes()


def unpack_refcounts(buf: bytes, order: int, *, narrow: bool = False) -> np.ndarray:
    """On-disk bytes -> refcount values as uint64, or (`narrow`) in the smallest native unsigned
    type that holds them (uint8 up to 8 bits): a quarter of the memory for the usual 16 bits."""
    _check_order(order)
    if order >= 3:
        raw = np.frombuffer(buf, dtype=_BIG[order])
        return raw.astype(raw.dtype.newbyteorder("=") if narrow else np.uint64)
    bits = 1 << order
    raw = np.frombuffer(buf, dtype=np.uint8)
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    vals = ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    return vals if narrow else vals.astype(np.uint64)
