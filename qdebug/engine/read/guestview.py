"""The guest view of small ranges (COW regions, subcluster remainders), computed with scalar
lookups: QEMU reads COW data and asks block status for a few KiB at a time, and the whole-table
numpy machinery of status.py costs more than the answer for ranges this small.

`segments()` walks the chain top-down exactly like status.resolve: the top layer is read through
the step's Txn (so a plan sees its own earlier changes), unallocated subclusters fall through to
the backing file, and past a backing file's end everything reads as zeros.
"""

from __future__ import annotations

import os
import struct
from typing import Callable

from ..file.chain import Chain, RawFile
from ..file.image import Image
from ..format import constants as C
from ..format.compression import decompress, descriptor_fields
from ..format.geometry import Geometry
from ..format.subclusters import (
    COMPRESSED,
    INVALID,
    NORMAL,
    UNALLOCATED_ALLOC,
    UNALLOCATED_PLAIN,
    subcluster_range_type,
)
from .guest import invalid_entry
from .kinds import PAST_END, RAW_DATA

Segment = tuple[int, int, int, int, int]  # guest start, end, kind, depth, host


class TopEntries:
    """The top layer's L2 entries as a running write step sees them (its own changes included).
    A base class the write layer's step context implements (compiled, a call through a base class
    is a direct call; through a Protocol it is a generic Python method call)."""

    def entry(self, guest_cluster: int) -> tuple[int, int]:
        raise NotImplementedError


_QQ = struct.Struct(">QQ")
_Q = struct.Struct(">Q")


def _layer_entry(img: Image, guest_cluster: int, g: Geometry) -> tuple[int, int]:
    """A backing file's L2 entry (backing files are only read: their L1 entries are kept)."""
    l1_index, idx = guest_cluster // g.l2_entries, guest_cluster % g.l2_entries
    if l1_index >= g.l1_size:
        return 0, 0
    l1 = img.backing_l1
    l2_off = l1.get(l1_index)
    if l2_off is None:
        l2_off = l1[l1_index] = _Q.unpack_from(img.mm, g.l1_offset + 8 * l1_index)[0] & C.L1E_OFFSET_MASK
    if not l2_off:
        return 0, 0
    off = l2_off + idx * g.esize
    if g.ext:
        w0, bm = _QQ.unpack_from(img.mm, off)
        return w0, bm
    return _Q.unpack_from(img.mm, off)[0], 0


def segments(chain: Chain, top: TopEntries | None, start: int, end: int,
             depth: int = 0, out: list[Segment] | None = None) -> list[Segment]:
    """[(start, end, kind, depth, host)] for the guest range; kind is a SubclusterType, RAW_DATA
    or PAST_END (read.kinds). host: byte offset in that layer
    (for COMPRESSED: the L2 descriptor). `top`: the running step, whose L2 entries the top layer has."""
    if out is None:
        out = []
    layers = chain.layers
    if depth >= len(layers):
        out.append((start, end, PAST_END, depth, 0))
        return out
    layer = layers[depth]
    if isinstance(layer, RawFile):
        lsize = layer.size if depth else 1 << 62
        if start >= lsize:
            out.append((start, end, PAST_END, depth, 0))
        elif end > lsize:
            out.append((start, lsize, RAW_DATA, depth, start))
            out.append((lsize, end, PAST_END, depth, 0))
        else:
            out.append((start, end, RAW_DATA, depth, start))
        return out
    g = layer.geometry
    # The top layer is read through its driver (its L2 entries cover the whole last cluster);
    # a backing file is read through the block layer, which zero-fills past its end.
    if depth:
        lsize = g.size
        if start >= lsize:
            out.append((start, end, PAST_END, depth, 0))
            return out
        if end > lsize:
            segments(chain, top, start, lsize, depth, out)
            out.append((lsize, end, PAST_END, depth, 0))
            return out
    cbits, cs, ext, scb = g.cbits, g.cs, g.ext, g.sc_bits
    pos = start
    while pos < end:
        gc = pos >> cbits
        w0, bm = top.entry(gc) if top is not None else _layer_entry(layer, gc, g)
        cend = min(end, (gc + 1) << cbits)
        while pos < cend:
            sc = (pos & (cs - 1)) >> scb
            t, n = subcluster_range_type(w0, bm, sc, extended=ext)
            run_end = min(cend, (gc << cbits) + ((sc + n) << scb)) if ext else cend
            if t == UNALLOCATED_PLAIN or t == UNALLOCATED_ALLOC:
                if depth + 1 < len(layers):
                    segments(chain, None, pos, run_end, depth + 1, out)
                else:
                    out.append((pos, run_end, t, depth, 0))
            elif t == NORMAL:
                out.append((pos, run_end, t, depth, (w0 & C.L2E_OFFSET_MASK) + (pos & (cs - 1))))
            elif t == COMPRESSED:
                out.append((pos, run_end, t, depth, w0))
            else:
                out.append((pos, run_end, t, depth, 0))
            pos = run_end
    return out


def reads_as_zero(chain: Chain, segs: list[Segment], *, exact: bool) -> bool:
    """Block status says ZERO for all of `segs`. exact=True is QEMU's is_zero (raw holes are zero,
    found with SEEK_DATA); exact=False is bdrv_co_is_zero_fast (raw files are always data).
    Past a short backing file's end both see zeros."""
    for s, e, kind, depth, _h in segs:
        if kind == RAW_DATA:
            if not exact:
                return False
            raw = chain.layers[depth]
            assert isinstance(raw, RawFile)
            if not _raw_hole(raw, s, e):
                return False
        elif kind == NORMAL or kind == COMPRESSED or kind == INVALID:
            return False
    return True


def _raw_hole(raw: RawFile, s: int, e: int) -> bool:
    if s >= raw.file_size:
        return True
    try:
        data = os.lseek(raw.fd, s, os.SEEK_DATA)
    except OSError:
        return True
    return data >= e


def read(chain: Chain, segs: list[Segment], start: int, end: int, cache: dict[tuple[int, int], bytes],
         top_pread: Callable[[int, int], bytes] | None = None) -> bytes:
    """Guest bytes of [start, end) from its segments (COW source data). `top_pread` reads the top
    layer's file where it differs from the Image (a write-back Txn's held-back pages)."""
    out = bytearray(end - start)
    for s, e, kind, depth, host in segs:
        pread = top_pread if depth == 0 and top_pread is not None else chain.layers[depth].pread
        if kind == NORMAL or kind == RAW_DATA:
            out[s - start:e - start] = pread(host, e - s)
        elif kind == COMPRESSED:
            img = chain.layers[depth]
            assert isinstance(img, Image)  # raw files have no compressed clusters
            key = (depth, host)
            data = cache.get(key)
            if data is None:
                off, nbytes = descriptor_fields(host, img.cluster_bits)
                data = cache[key] = decompress(pread(off, nbytes), img.cluster_size, img.header.compression_type,
                                               f"{img.path}: compressed cluster (host 0x{off:x})")
            base = s & ~(img.cluster_size - 1)
            out[s - start:e - start] = data[s - base:e - base]
        elif kind == INVALID:
            raise invalid_entry(chain, depth, s)
    return bytes(out)
