"""A corruption generator for check/repair tests: healthy images of many shapes made by QEMU,
then one precise, named corruption written with plain file I/O (not through qdebug's writer).

Each corruption picks its target from the image's own metadata (found with qdebug's reader) and
returns a short description, or None when the shape has nothing to corrupt that way.
"""

from __future__ import annotations

import os
import struct

from qdebug.engine.file.image import open_image
from qdebug.engine.format import constants as C
from tests.qemu import create, qemu_img, qemu_io

# name -> create options; every shape gets data, zero, compressed (where possible) clusters.
SHAPES = {
    "ext64k": dict(cluster_size="64k", extended_l2=True),
    "ext16k": dict(cluster_size="16k", extended_l2=True),
    "ext2M": dict(cluster_size="2M", extended_l2=True),
    "std64k": dict(cluster_size="64k", extended_l2=False),
    "std4k-rc8": dict(cluster_size="4k", extended_l2=False, refcount_bits=8),
    "ext64k-rc2": dict(cluster_size="64k", extended_l2=True, refcount_bits=2),
    "ext64k-rc64": dict(cluster_size="64k", extended_l2=True, refcount_bits=64),
    "ext32k-snap": dict(cluster_size="32k", extended_l2=True, snapshot=True),
    "ext64k-backing": dict(cluster_size="64k", extended_l2=True, backing=True),
    "ext64k-zstd": dict(cluster_size="64k", extended_l2=True, compression_type="zstd"),
    "std64k-rc1": dict(cluster_size="64k", extended_l2=False, refcount_bits=1),
    "v2-64k": dict(cluster_size="64k", extended_l2=False, compat="0.10"),
    "ext64k-bitmaps": dict(cluster_size="64k", extended_l2=True, bitmaps=True),
}


def make_shape(tmp, name: str) -> str:
    """A healthy image of shape `name` in directory `tmp` (qemu-img check finds it clean)."""
    opts = dict(SHAPES[name])
    snapshot = opts.pop("snapshot", False)
    backing = opts.pop("backing", False)
    bitmaps = opts.pop("bitmaps", False)
    cs = _parse(opts["cluster_size"])
    size = max(16 * cs, 4 << 20)
    path = os.path.join(str(tmp), f"{name}.qcow2")
    if backing:
        base = os.path.join(str(tmp), f"{name}-base.raw")
        with open(base, "wb") as f:
            f.write(b"\xee" * size)
        create(path, size, backing=base, backing_fmt="raw", **opts)
    else:
        create(path, size, **opts)
    sc = cs // 32
    cmds = [f"write -P 0x11 0 {cs}", f"write -P 0x12 {cs + 3 * sc} {2 * sc}", f"write -z {cs + 8 * sc} {sc}",
            f"write -P 0x13 {3 * cs} {2 * cs}", f"write -P 0x14 {6 * cs + 5} 700"]
    if opts.get("refcount_bits", 16) > 1:
        cmds += [f"write -c -P 0x15 {8 * cs} {cs}", f"write -c -P 0x16 {9 * cs} {cs}"]
    cmds += [f"write -P 0x17 {12 * cs} {cs}", f"discard {12 * cs} {cs}", f"write -P 0x18 {13 * cs} {cs}"]
    qemu_io(path, *cmds)
    if bitmaps:  # persistent dirty bitmaps: a directory, bitmap tables and (after a write) data clusters
        qemu_img("bitmap", "--add", path, "b0")
        qemu_img("bitmap", "--add", "-g", "65536", path, "b1")
        qemu_io(path, f"write -P 0x31 {15 * cs} {cs}")
    if snapshot:
        qemu_img("snapshot", "-c", "snap1", path)
        qemu_io(path, f"write -P 0x21 {cs} {sc}", f"write -P 0x22 {14 * cs} {cs}")
    return path


def _parse(s: str) -> int:
    mult = {"k": 1 << 10, "M": 1 << 20}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


# ---- raw access --------------------------------------------------------------------------------
def _rd(path, off, n=8):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def _wr(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _q(path, off):
    return struct.unpack(">Q", _rd(path, off))[0]


def _setq(path, off, v):
    _wr(path, off, struct.pack(">Q", v))


class Layout:
    """Where things are: entries by type, found with qdebug's reader."""

    def __init__(self, path):
        with open_image(path) as img:
            h = img.header
            self.h = h
            self.cs = h.cluster_size
            self.esize = h.l2_entry_size
            self.entries = []  # (entry file offset, word0, bitmap, l1_index, l2_index)
            self.l1 = [(h.l1_table_offset + 8 * i, int(e)) for i, e in enumerate(img.l1) if int(e)]
            for i, e in enumerate(img.l1):
                l2 = int(e) & C.L1E_OFFSET_MASK
                if not l2:
                    continue
                w0, bm = img.l2_table(l2)
                for j in range(len(w0)):
                    self.entries.append((l2 + j * self.esize, int(w0[j]), int(bm[j]) if bm is not None else 0, i, j))
            self.reftable_offset = h.refcount_table_offset
            self.reftable = [int(x) for x in img.reftable]
            self.file_size = img.file_size

    def normal(self):
        return [e for e in self.entries if not e[1] & C.QCOW_OFLAG_COMPRESSED and e[1] & C.L2E_OFFSET_MASK]

    def compressed(self):
        return [e for e in self.entries if e[1] & C.QCOW_OFLAG_COMPRESSED]

    def unallocated(self):
        return [e for e in self.entries if not e[1] & C.L2E_OFFSET_MASK and not e[1] & C.QCOW_OFLAG_COMPRESSED]

    def refcount_entry(self, cluster):
        """(file offset, bits) of the refcount entry of host cluster `cluster`."""
        h = self.h
        per = h.refcount_block_entries
        block = self.reftable[cluster // per] & C.REFT_OFFSET_MASK
        return block + (cluster % per) * h.refcount_bits // 8, h.refcount_bits, (cluster % per) * h.refcount_bits % 8


def get_refcount(path, lay, cluster):
    off, bits, shift = lay.refcount_entry(cluster)
    if bits >= 8:
        return int.from_bytes(_rd(path, off, bits // 8), "big")
    return (_rd(path, off, 1)[0] >> shift) & ((1 << bits) - 1)


def set_refcount(path, lay, cluster, value):
    off, bits, shift = lay.refcount_entry(cluster)
    if bits >= 8:
        _wr(path, off, value.to_bytes(bits // 8, "big"))
        return
    mask = ((1 << bits) - 1) << shift
    _wr(path, off, bytes([(_rd(path, off, 1)[0] & ~mask) | (value << shift)]))


# ---- corruptions: each returns a description or None (not applicable) --------------------------
def both_bits(path, lay):
    """An allocated cluster whose subcluster 3 is both allocated and zero."""
    if not lay.h.extended_l2 or not lay.normal():
        return None
    e = lay.normal()[0]
    _setq(path, e[0] + 8, e[2] | (1 << 3) | (1 << 35))
    return f"L2 {e[3]}/{e[4]}: sc3 allocated+zero"


def both_bits_zero_sc(path, lay):
    """A partially written cluster: an unallocated subcluster gets both bits (data beyond it kept)."""
    if not lay.h.extended_l2:
        return None
    part = [e for e in lay.normal() if (e[2] & 0xFFFFFFFF) != 0xFFFFFFFF]
    if not part:
        return None
    e = part[0]
    free = next(i for i in range(32) if not (e[2] >> i) & 1)
    _setq(path, e[0] + 8, e[2] | (1 << free) | (1 << (32 + free)))
    return f"L2 {e[3]}/{e[4]}: sc{free} allocated+zero"


def alloc_bits_unallocated(path, lay):
    if not lay.h.extended_l2 or not lay.unallocated():
        return None
    e = lay.unallocated()[-1]
    _setq(path, e[0] + 8, e[2] | 0x3)
    return f"L2 {e[3]}/{e[4]}: offset 0 with alloc bits"


def compressed_bitmap(path, lay):
    if not lay.h.extended_l2 or not lay.compressed():
        return None
    e = lay.compressed()[0]
    _setq(path, e[0] + 8, 0x0000000180000000)
    return f"L2 {e[3]}/{e[4]}: compressed with bitmap"


def refcount_up(path, lay):
    e = lay.normal()[-1]
    c = (e[1] & C.L2E_OFFSET_MASK) // lay.cs
    v = get_refcount(path, lay, c)
    if v + 1 >= 1 << lay.h.refcount_bits:
        return None
    set_refcount(path, lay, c, v + 1)
    return f"cluster {c} refcount {v}->{v + 1}"


def refcount_down(path, lay):
    """A referenced cluster whose refcount drops (to 0 when it was 1: needs a rebuild)."""
    e = lay.normal()[0]
    c = (e[1] & C.L2E_OFFSET_MASK) // lay.cs
    v = get_refcount(path, lay, c)
    set_refcount(path, lay, c, v - 1)
    return f"cluster {c} refcount {v}->{v - 1}"


def leak_free_cluster(path, lay):
    """A free cluster inside the file gets refcount 1 (a leak); the file grows by one cluster if needed."""
    end = -(-lay.file_size // lay.cs)
    for c in range(1, end):
        if get_refcount(path, lay, c) == 0:
            break
    else:
        c = end
        os.truncate(path, (end + 1) * lay.cs)
    if c >= lay.h.refcount_block_entries:
        return None
    set_refcount(path, lay, c, 1)
    return f"free cluster {c} refcount 1"


def copied_cleared(path, lay):
    e = next((e for e in lay.normal() if e[1] & C.QCOW_OFLAG_COPIED), None)
    if e is None:
        return None
    _setq(path, e[0], e[1] & ~C.QCOW_OFLAG_COPIED)
    return f"L2 {e[3]}/{e[4]}: COPIED cleared"


def copied_l1_cleared(path, lay):
    off, v = lay.l1[0]
    _setq(path, off, v ^ C.QCOW_OFLAG_COPIED)
    return "L1 0: COPIED flipped"


def l2_reserved_bits(path, lay):
    e = lay.normal()[0]
    _setq(path, e[0], e[1] | (1 << 58) | (1 << 3))
    return f"L2 {e[3]}/{e[4]}: reserved bits"


def l1_reserved_bits(path, lay):
    off, v = lay.l1[0]
    _setq(path, off, v | (1 << 60) | 1)
    return "L1 0: reserved bits"


def l1_only_flags(path, lay):
    """An L1 entry with COPIED but offset 0: QEMU walks the header cluster as an L2 table."""
    off, v = lay.l1[0]
    _setq(path, off, C.QCOW_OFLAG_COPIED)
    return "L1 0: offset 0 with COPIED"


def l2_table_unaligned(path, lay):
    off, v = lay.l1[0]
    _setq(path, off, v + 512)
    return "L1 0: L2 table offset + 512"


def data_unaligned(path, lay):
    e = lay.normal()[0]
    _setq(path, e[0], e[1] + 512)
    return f"L2 {e[3]}/{e[4]}: data offset + 512"


def prealloc_unaligned(path, lay):
    """An allocated cluster with no allocation bits (or the zero flag) and an unaligned offset."""
    e = lay.normal()[-1]
    if lay.h.version < 3 and not lay.h.extended_l2:
        return None  # no zero flag in v2 images
    if lay.h.extended_l2:
        _setq(path, e[0] + 8, 0xFFFFFFFF00000000)
        _setq(path, e[0], e[1] + 512)
    else:
        _setq(path, e[0], e[1] + 512 | 1)
    return f"L2 {e[3]}/{e[4]}: zero-only cluster at offset + 512"


def data_past_eof(path, lay):
    e = lay.normal()[0]
    _setq(path, e[0], (e[1] & ~C.L2E_OFFSET_MASK) | (lay.file_size + 64 * lay.cs))
    return f"L2 {e[3]}/{e[4]}: data cluster past EOF"


def reftable_reserved(path, lay):
    _setq(path, lay.reftable_offset, lay.reftable[0] | 0x10)
    return "reftable 0: reserved bits"


def refblock_unaligned(path, lay):
    _setq(path, lay.reftable_offset, lay.reftable[0] + 512)
    return "reftable 0: refblock offset + 512"


def refblock_dropped(path, lay):
    """The refcount table loses its first block: every refcount reads 0 (QEMU must rebuild)."""
    _setq(path, lay.reftable_offset, 0)
    return "reftable 0: block dropped"


def refblock_outside(path, lay):
    n = len([x for x in lay.reftable if x])
    if n >= len(lay.reftable):
        return None
    _setq(path, lay.reftable_offset + 8 * n, (lay.file_size // lay.cs + 10) * lay.cs)
    return f"reftable {n}: block outside the image"


def truncate_tail(path, lay):
    """The file loses its last cluster (and a half)."""
    new = max(lay.file_size - lay.cs - lay.cs // 2, 4 * lay.cs)
    os.truncate(path, new)
    return f"truncated to {new}"


def corrupt_bit(path, lay):
    if lay.h.version < 3:
        return None
    _setq(path, 72, _q(path, 72) | C.QCOW2_INCOMPAT_CORRUPT)
    return "corrupt bit set"


def dirty_bit(path, lay):
    if lay.h.version < 3:
        return None
    _setq(path, 72, _q(path, 72) | C.QCOW2_INCOMPAT_DIRTY)
    return "dirty bit set"


def l2_duplicate(path, lay):
    """Two guest clusters share one data cluster (refcount 1, referenced twice)."""
    n = lay.normal()
    if len(n) < 2:
        return None
    _setq(path, n[1][0], (n[1][1] & ~C.L2E_OFFSET_MASK) | (n[0][1] & C.L2E_OFFSET_MASK))
    if lay.h.extended_l2:
        _setq(path, n[1][0] + 8, n[0][2])
    return f"L2 {n[1][3]}/{n[1][4]} shares the data cluster of {n[0][3]}/{n[0][4]}"


CORRUPTIONS = {f.__name__: f for f in (
    both_bits, both_bits_zero_sc, alloc_bits_unallocated, compressed_bitmap, refcount_up, refcount_down,
    leak_free_cluster, copied_cleared, copied_l1_cleared, l2_reserved_bits, l1_reserved_bits, l1_only_flags, l2_table_unaligned,
    data_unaligned, prealloc_unaligned, data_past_eof, reftable_reserved, refblock_unaligned, refblock_dropped, refblock_outside,
    truncate_tail, corrupt_bit, dirty_bit, l2_duplicate)}

# The invalid-subcluster shapes QEMU reports but never repairs.
SUBCLUSTER_CORRUPTIONS = ("both_bits", "both_bits_zero_sc", "alloc_bits_unallocated", "compressed_bitmap")


def corrupt(path: str, name: str):
    return CORRUPTIONS[name](path, Layout(path))
