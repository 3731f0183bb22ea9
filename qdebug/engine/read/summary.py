"""Whole-image views: per-type subcluster counts and the `info` record.

Whole-table work reads L2 tables with preadv after announcing them to the kernel (see l2tables).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import CorruptImage
from ..file.chain import data_file_warning
from ..file.image import Image
from ..format import constants as C
from ..format.bitmaps import bitmaps_extension, directory_entries, info_flags
from ..format.header import header_dump
from ..format.subclusters import SubclusterType
from .l2tables import l2_table_offsets, readahead

_COUNT_ENTRIES = 1 << 13  # entries per numpy pass: temporaries stay under glibc's mmap threshold
_WINDOW = 1024  # L2 tables announced to the kernel (read-ahead) at a time


def subcluster_counts(img: Image) -> dict[str, int]:
    """How many subclusters of each type the active L1 maps (clusters without an L2 table count
    as UNALLOCATED_PLAIN).

    Per entry only a category (plain, allocated, compressed, invalid) and the popcounts of the two
    bitmap halves are computed, from the raw bytes (no byteswapped copy). Tables are read with
    preadv into one small buffer (no page faults, bounded memory) after a window of them was
    announced to the kernel (POSIX_FADV_WILLNEED: a cold-cache scan needs the read-ahead)."""
    h = img.header
    spc = h.subclusters_per_cluster
    per = h.l2_entries
    nclusters = h.guest_clusters
    tables = l2_table_offsets(img)
    if len(tables):
        tables = tables[(tables[:, 1] + h.cluster_size <= img.file_size) & (tables[:, 0] * per < nclusters)]
    acc = np.zeros(len(SubclusterType), dtype=np.int64)
    covered = 0
    cs = h.cluster_size
    for bad in np.flatnonzero(tables[:, 1] % cs).tolist() if len(tables) else ():
        img.l2_table(int(tables[bad, 1]), int(tables[bad, 0]))  # raises: not cluster aligned
    words = 2 if h.extended_l2 else 1
    esize = 8 * words
    buf = np.empty((_COUNT_ENTRIES, words), dtype="<u8")
    fill = 0

    def count(k: int) -> None:
        _count_batch(buf[:k, 0], buf[:k, 1] if words == 2 else None, acc, h.has_data_file)

    readahead(img, tables[:_WINDOW, 1].tolist(), cs)
    for w in range(0, len(tables), _WINDOW):
        window = tables[w:w + _WINDOW]
        readahead(img, tables[w + _WINDOW:w + 2 * _WINDOW, 1].tolist(), cs)  # one window ahead
        for l1_index, off in window.tolist():
            n = min(per, nclusters - l1_index * per)
            pos = 0
            while pos < n:
                take = min(n - pos, _COUNT_ENTRIES - fill)
                if os.preadv(img.fd, [buf[fill:fill + take]], off + pos * esize) != take * esize:
                    raise CorruptImage(f"L2 table (L1 index {l1_index}) at 0x{off:x} could not be read whole")
                fill += take
                pos += take
                if fill == _COUNT_ENTRIES:
                    count(fill)
                    fill = 0
            covered += n
    if fill:
        count(fill)
    T = SubclusterType
    if h.extended_l2:
        plain, nal, ncomp, nbad, normal, zero_alloc, zero_plain = acc.tolist()
        counts = np.zeros(len(T), dtype=np.int64)
        counts[T.UNALLOCATED_PLAIN] = 32 * plain - zero_plain
        counts[T.ZERO_PLAIN] = zero_plain
        counts[T.NORMAL] = normal
        counts[T.ZERO_ALLOC] = zero_alloc
        counts[T.UNALLOCATED_ALLOC] = 32 * nal - normal - zero_alloc
        counts[T.COMPRESSED] = 32 * ncomp
        counts[T.INVALID] = 32 * nbad
    else:
        counts = acc
    counts[SubclusterType.UNALLOCATED_PLAIN] += (nclusters - covered) * spc
    return {t.name: int(counts[t]) for t in SubclusterType}


def _bswap(v: int) -> np.uint64:
    return np.uint64(int.from_bytes(v.to_bytes(8, "big"), "little"))


# The counting works on the tables' raw bytes read as native (little-endian) u64, so no byteswapped
# copy is made: masks are byteswapped instead. Popcounts do not care about byte order, and the
# alloc half (big-endian low 32 bits) lands in the raw high half at the bit positions the zero half
# takes in the raw low half, so `a & z` keeps its meaning.
_OFFSET = _bswap(C.L2E_OFFSET_MASK)
_COMPRESSED = _bswap(C.QCOW_OFLAG_COMPRESSED)
_ZERO_FLAG = _bswap(C.QCOW_OFLAG_ZERO)
_LOW32 = np.uint64(0xFFFFFFFF)


def _std_type_lut() -> np.ndarray:
    """Standard L2 type by code = compressed<<2 | allocated<<1 | zero flag."""
    T = SubclusterType
    return np.array([T.UNALLOCATED_PLAIN, T.ZERO_PLAIN, T.NORMAL, T.ZERO_ALLOC] + [T.COMPRESSED] * 4, dtype=np.uint8)


_STD_LUT = _std_type_lut()


_COPIED = _bswap(C.QCOW_OFLAG_COPIED)


def _count_batch(w0: np.ndarray, bm: np.ndarray | None, acc: np.ndarray, data_file: bool = False) -> None:
    """Add raw L2 entries to acc = [plain, allocated, compressed, invalid entries, NORMAL, ZERO_ALLOC,
    ZERO_PLAIN subclusters] (extended L2) or to the per-type counts (standard L2). `data_file`:
    offset 0 with COPIED is allocated (an external data file, as QEMU's qcow2_get_cluster_type)."""
    n = len(w0)
    comp = (w0 & _COMPRESSED) != 0
    al = (w0 & _OFFSET) != 0
    if data_file:
        al |= (w0 & _COPIED) != 0
    ncomp = int(np.count_nonzero(comp))
    if ncomp:
        al &= ~comp
    if bm is None:
        code = (comp.view(np.uint8) << 2) | (al.view(np.uint8) << 1) | ((w0 & _ZERO_FLAG) != 0).view(np.uint8)
        acc += np.bincount(_STD_LUT[code], minlength=len(acc))
        return
    if not bm.any():  # no subcluster bits at all: preallocated or empty tables
        nal = int(np.count_nonzero(al))
        acc[:3] += (n - nal - ncomp, nal, ncomp)
        return
    a = bm >> np.uint64(32)
    z = bm & _LOW32
    # INVALID: alloc and zero bit together in an allocated cluster, any alloc bit in an unallocated one
    bad = (a & (z | (al.astype(np.uint64) - np.uint64(1)))) != 0
    if ncomp:
        bad &= ~comp
    nbad = int(np.count_nonzero(bad))
    na = np.bitwise_count(a)
    nz = np.bitwise_count(z)
    if nbad or ncomp:
        ok = ~(bad | comp)
        na *= ok
        nz *= ok
        al &= ok
    nal = int(np.count_nonzero(al))
    za = int((nz * al).sum(dtype=np.int64))
    acc += (n - nal - ncomp - nbad, nal, ncomp, nbad, int(na.sum(dtype=np.int64)), za,
            int(nz.sum(dtype=np.int64)) - za)


def info_record(chain, *, counts: bool = True) -> dict:
    """Everything `qdebug info` shows, as plain JSON-able data (qemu-img info's keys first)."""
    img: Image = chain.top
    h = img.header
    st = os.stat(img.path)
    rec: dict = {
        "virtual-size": h.size,
        "filename": img.path,
        "cluster-size": h.cluster_size,
        "format": "qcow2",
        "actual-size": st.st_blocks * 512,
        "dirty-flag": h.is_dirty,
    }
    if h.backing_file:
        rec["backing-filename"] = h.backing_file
        if h.backing_format:
            rec["backing-filename-format"] = h.backing_format
        rec["full-backing-filename"] = path_combine(img.path, h.backing_file)
    snaps = img.snapshots()
    if snaps:
        rec["snapshots"] = [
            {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size, "date-sec": s.date_sec,
             "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_nsec // 10**9,
             "vm-clock-nsec": s.vm_clock_nsec % 10**9, **({"icount": s.icount} if s.icount >= 0 else {})}
            for s in snaps]
    problems: list[str] = []
    data = {"compat": "1.1" if h.version >= 3 else "0.10", "compression-type": h.compression_name}
    if h.version >= 3:
        data["lazy-refcounts"] = bool(h.compatible_features & C.QCOW2_COMPAT_LAZY_REFCOUNTS)
        bitmaps, problem = bitmap_infos(img)
        if problem:
            problems.append(problem)
        if bitmaps:
            data["bitmaps"] = bitmaps
        data["refcount-bits"] = h.refcount_bits
        if h.data_file_path is not None:  # (QEMU shows the extension's name even without bit 2)
            data["data-file"] = h.data_file_path
        if h.has_data_file:
            data["data-file-raw"] = h.data_file_raw
        data.update({"corrupt": h.is_corrupt, "extended-l2": h.extended_l2})
    else:
        data["refcount-bits"] = h.refcount_bits
    rec["format-specific"] = {"type": "qcow2", "data": data}
    rec["qdebug"] = {
        "version": h.version,
        "header-length": h.header_length,
        "features": h.feature_list(),
        "incompatible-features": h.incompatible_features,
        "compatible-features": h.compatible_features,
        "autoclear-features": h.autoclear_features,
        "extensions": [{"type": e.type, "name": e.name, "offset": e.offset, "length": len(e.data)}
                       for e in h.extensions],
        # every field of the fixed header, by the spec's names (the field table's dump)
        "header-fields": [{"name": f.name, "offset": f.offset, "size": f.width, "value": v}
                          for f, v, _text in header_dump(h)],
        "geometry": {
            "cluster-bits": h.cluster_bits,
            "subclusters-per-cluster": h.subclusters_per_cluster,
            "subcluster-size": h.subcluster_size,
            "l2-entry-size": h.l2_entry_size,
            "l2-entries-per-table": h.l2_entries,
            "l1-size": h.l1_size,
            "l1-table-offset": h.l1_table_offset,
            "l2-tables": int(len(l2_table_offsets(img))),
            "refcount-order": h.refcount_order,
            "refcount-table-offset": h.refcount_table_offset,
            "refcount-table-clusters": h.refcount_table_clusters,
            "refcount-blocks": int(np.count_nonzero(np.asarray(img.reftable) & np.uint64(C.REFT_OFFSET_MASK))),
            "refcount-block-entries": h.refcount_block_entries,
            "file-size": img.file_size,
        },
        "backing-chain": [{"depth": d, "filename": layer.path, "format": getattr(layer, "format", "qcow2"),
                           "virtual-size": layer.size} for d, layer in enumerate(chain.layers)],
        "warnings": list(chain.warnings) + problems + unreadable_tables(img) + [
            w for w in [data_file_warning(img)] if w],
    }
    if counts:
        # kebab-case keys, as every key qdebug writes (ZERO_PLAIN: zero-plain)
        rec["qdebug"]["subclusters"] = {k.lower().replace("_", "-"): v for k, v in subcluster_counts(img).items()}
    return rec


def bitmap_infos(img: Image) -> tuple[list[dict], str | None]:
    """The persistent dirty bitmaps as qemu-img info lists them (none where QEMU ignores the
    extension: its autoclear bit is cleared), and what keeps them from being listed (a damaged
    directory: `check` says more)."""
    ext = bitmaps_extension(img.header)
    if ext is None or not ext[0]:
        return [], None
    nb, dir_size, dir_off = ext
    if dir_off + dir_size > img.file_size:
        return [], (f"{img.path}: the bitmap directory (0x{dir_off:x}, {dir_size} bytes) runs past the end of the "
                    f"file (0x{img.file_size:x}); bitmaps not listed")
    entries, truncated = directory_entries(img.pread(dir_off, dir_size), nb)
    if truncated:
        return [], (f"{img.path}: the bitmap directory at 0x{dir_off:x} ({dir_size} bytes) ends before its {nb} "
                    "entries; bitmaps not listed")
    return [{"flags": info_flags(e.flags), "name": e.name, "granularity": 1 << e.granularity_bits} for e in entries], None


def raw_info_record(layer) -> dict:
    """qemu-img info's record of a raw image (a raw backing file in --backing-chain)."""
    return {"virtual-size": layer.size, "filename": layer.path, "format": "raw",
            "actual-size": os.stat(layer.path).st_blocks * 512, "dirty-flag": False}


def path_combine(base: str, name: str) -> str:
    """QEMU's path_combine: where a relative backing file name points from its image (the image's
    directory as written, up to its last '/'), as qemu-img info reports full-backing-filename."""
    if name.startswith("/"):
        return name
    return base[:base.rfind("/") + 1] + name


def unreadable_tables(img: Image, limit: int = 3) -> list[str]:
    """HX: warnings for active L2 tables that the counts skip (past the end of the file)."""
    t = l2_table_offsets(img)
    if not len(t):
        return []
    cs = img.header.cluster_size
    bad = t[t[:, 1] + cs > img.file_size]
    out = [f"{img.path}: L2 table (L1 index {i}) at 0x{off:x} runs past the end of the file "
           f"(0x{img.file_size:x}); its clusters are counted as unallocated" for i, off in bad[:limit].tolist()]
    if len(bad) > limit:
        out.append(f"{img.path}: {len(bad) - limit} more L2 tables run past the end of the file")
    return out
