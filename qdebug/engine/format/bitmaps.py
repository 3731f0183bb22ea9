"""Persistent dirty bitmaps: the header extension and the bitmap directory (qcow2.txt "Bitmaps
extension", "Bitmap directory"), decoded; `check` counts their clusters, forensics maps them."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import constants as C

BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, granularity, name size, extra


@dataclass(frozen=True)
class BitmapEntry:
    """One bitmap directory entry."""

    index: int
    table_offset: int
    table_size: int  # entries (u64 each)
    flags: int
    type: int
    granularity_bits: int
    name: str
    name_size: int


def bitmaps_extension(header) -> tuple[int, int, int] | None:
    """(number of bitmaps, directory size, directory offset), or None where QEMU ignores the
    extension (missing, too short, or the autoclear bit cleared: its sizes are unchecked then)."""
    ext = next((e for e in header.extensions if e.type == C.QCOW2_EXT_MAGIC_BITMAPS), None)
    if ext is None or len(ext.data) < 24 or not header.autoclear_features & C.QCOW2_AUTOCLEAR_BITMAPS:
        return None
    nb, _reserved, dir_size, dir_off = struct.unpack_from(">IIQQ", ext.data)
    return nb, dir_size, dir_off


def directory_entries(raw: bytes, count: int) -> tuple[list[BitmapEntry], bool]:
    """The first `count` entries of a bitmap directory read into `raw`, and whether the directory
    ended early (truncated: the entries after that are unknown)."""
    out: list[BitmapEntry] = []
    p = 0
    for i in range(count):
        if p + _ENTRY.size > len(raw):
            return out, True
        t_off, t_size, flags, typ, gran, name_size, extra = _ENTRY.unpack_from(raw, p)
        name = raw[p + _ENTRY.size + extra:p + _ENTRY.size + extra + name_size].decode("utf-8", "replace")
        out.append(BitmapEntry(i, t_off, t_size, flags, typ, gran, name, name_size))
        size = _ENTRY.size + extra + name_size
        p += size + (-size % 8)
    return out, False


BME_FLAG_IN_USE, BME_FLAG_AUTO = 1, 2


def info_flags(flags: int) -> list[str]:
    """qemu-img info's names of a bitmap's flags, in its order (reserved bits are not shown)."""
    return [name for bit, name in ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto")) if flags & bit]
