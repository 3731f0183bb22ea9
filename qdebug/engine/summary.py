"""Whole-image views: per-type subcluster counts and the `info` record.

Whole-table work goes L2 table by L2 table (batched), after asking the kernel to read the tables
ahead (madvise WILLNEED): on a cold page cache an mmap scan otherwise degrades to one synchronous
4 KiB read per page.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterator

import numpy as np

from . import constants as C
from .image import Image
from .subclusters import SubclusterType, type_counts

_PAGE = mmap.PAGESIZE
_BATCH = 64  # L2 tables per numpy batch


def prefetch(img: Image, offsets: np.ndarray, length: int) -> None:
    """madvise(WILLNEED) each [offset, offset+length) of the image's mapping (best effort)."""
    mm = img.mm
    if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise"):
        return
    for off in np.asarray(offsets, dtype=np.int64).tolist():
        a = off - off % _PAGE
        n = min(length + (off - a), img.file_size - a)
        if n > 0:
            try:
                mm.madvise(mmap.MADV_WILLNEED, a, n)
            except (OSError, ValueError):
                return


def l2_table_offsets(img: Image) -> np.ndarray:
    """(l1_index, l2_offset) pairs of the active L1 entries that point at an L2 table."""
    l1 = np.asarray(img.l1, dtype=np.uint64)
    offs = (l1 & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
    idx = np.flatnonzero(offs)
    return np.stack([idx, offs[idx]], axis=1) if len(idx) else np.zeros((0, 2), dtype=np.int64)


def iter_l2_batches(img: Image, tables: np.ndarray | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield (guest cluster indices, word0, bitmap) for batches of L2 tables, limited to the
    guest clusters inside the virtual size. Tables past the end of the file are skipped (the
    checker reports them)."""
    h = img.header
    per = h.l2_entries
    nclusters = h.guest_clusters
    tables = l2_table_offsets(img) if tables is None else tables
    tables = tables[tables[:, 1] + h.cluster_size <= img.file_size] if len(tables) else tables
    tables = tables[tables[:, 0] * per < nclusters] if len(tables) else tables
    prefetch(img, tables[:, 1] if len(tables) else np.zeros(0), h.cluster_size)
    for b in range(0, len(tables), _BATCH):
        chunk = tables[b:b + _BATCH]
        w0s, bms, gcs = [], [], []
        for l1_index, l2_off in chunk.tolist():
            w0, bm = img.l2_table(l2_off, l1_index)
            n = min(per, nclusters - l1_index * per)
            w0s.append(w0[:n])
            if bm is not None:
                bms.append(bm[:n])
            gcs.append(np.arange(l1_index * per, l1_index * per + n, dtype=np.int64))
        yield (np.concatenate(gcs), np.concatenate(w0s), np.concatenate(bms) if bms else None)


def subcluster_counts(img: Image) -> dict[str, int]:
    """How many subclusters of each type the active L1 maps (clusters without an L2 table count
    as UNALLOCATED_PLAIN)."""
    h = img.header
    spc = h.subclusters_per_cluster
    counts = np.zeros(len(SubclusterType), dtype=np.int64)
    covered = 0
    for gcs, w0, bm in iter_l2_batches(img):
        counts += type_counts(w0, bm, extended=h.extended_l2)
        covered += len(gcs)
    counts[SubclusterType.UNALLOCATED_PLAIN] += (h.guest_clusters - covered) * spc
    return {t.name: int(counts[t]) for t in SubclusterType}


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
        if len(chain.layers) > 1:
            rec["full-backing-filename"] = chain.layers[1].path
    snaps = img.snapshots()
    if snaps:
        rec["snapshots"] = [
            {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size, "date-sec": s.date_sec,
             "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_nsec // 10**9,
             "vm-clock-nsec": s.vm_clock_nsec % 10**9, "icount": None}
            for s in snaps]
    data = {"compat": "1.1" if h.version >= 3 else "0.10", "compression-type": h.compression_name}
    if h.version >= 3:
        data.update({"lazy-refcounts": bool(h.compatible_features & C.QCOW2_COMPAT_LAZY_REFCOUNTS),
                     "refcount-bits": h.refcount_bits, "corrupt": h.is_corrupt, "extended-l2": h.extended_l2})
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
        "extensions": [{"type": f"0x{e.type:08x}", "name": e.name, "offset": e.offset, "length": len(e.data)}
                       for e in h.extensions],
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
        "warnings": list(chain.warnings) + unreadable_tables(img),
    }
    if counts:
        rec["qdebug"]["subclusters"] = subcluster_counts(img)
    return rec


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
