"""QEMU 7.2's data write path (qcow2_co_pwritev_part) with subclusters.

alloc_host_offset splits a request into host-contiguous pieces with handle_copied (clusters
writable in place: COPIED) and handle_alloc (new clusters, first fit, then extended at the exact
next host offset); calculate_l2_meta derives cow_start / cow_end from the old subcluster types
(keep_old, ctz/clz of the old allocation bitmap, compressed sources); link_l2 performs the COW,
points the L2 entries at the new clusters, ORs the written subclusters into the bitmap and frees
the old clusters. COW data is the current guest view (read through the chain), as QEMU reads it
through its own driver. Where QEMU would zero-fill instead of copying (handle_alloc_space) the
plan says skip_cow; the bytes are the same.
"""

from __future__ import annotations

from typing import Final

from ..format import constants as C
from ..format.subclusters import (
    COMPRESSED,
    INVALID,
    NORMAL,
    UNALLOCATED_ALLOC,
    ZERO_ALLOC,
    clz32,
    ctz32,
    subcluster_range_type,
    subcluster_type,
)
from ..read import guestview
from ..read.guestview import Segment
from .context import StepContext
from .minimal_cow import minimal_cow
from .step import L2Meta
from .txn import L2_AFTER_REFCOUNT, Fill

MAX_REQUEST: Final = (1 << 31) - 512  # BDRV_REQUEST_MAX_BYTES rounded down to a 512-byte multiple


def needs_new_alloc(word0: int, ext: bool) -> bool:
    """cluster_needs_new_alloc: only NORMAL / ZERO_ALLOC clusters with COPIED are written in place."""
    if word0 & C.QCOW_OFLAG_COMPRESSED or not word0 & C.L2E_OFFSET_MASK:
        return True
    return not word0 & C.QCOW_OFLAG_COPIED


def _nb_clusters(ctx: StepContext, offset: int, nbytes: int) -> int:
    g = ctx.g
    n = -(-((offset & (g.cs - 1)) + nbytes) // g.cs)
    idx = (offset >> g.cbits) % g.l2_entries
    return min(min(n, g.slice_entries - idx % g.slice_entries), MAX_REQUEST >> g.cbits or 1)


def _type(ctx: StepContext, w0: int, bm: int, sc: int) -> int:
    return subcluster_type(w0, bm, sc, extended=ctx.g.ext)


def calculate_l2_meta(ctx: StepContext, host: int, offset: int, nbytes: int, l2_off: int,
                      keep_old: bool, metas: list[L2Meta]) -> None:
    g = ctx.g
    cs = g.cs
    w_start = offset & (cs - 1)
    w_end = w_start + nbytes
    nb = -(-w_end // cs)
    gc0 = offset >> g.cbits
    entries = [ctx.entry(gc0 + i) for i in range(nb)]
    skip = keep_old
    for i, (w0, bm) in enumerate(entries):
        if skip:
            wf = max(w_start, i * cs)
            wt = min(w_end, (i + 1) * cs)
            first = (wf & (cs - 1)) >> g.sc_bits
            last = ((wt - 1) & (cs - 1)) >> g.sc_bits
            t, cnt = subcluster_range_type(w0, bm, first, extended=g.ext)
            if t != NORMAL or first + cnt <= last:
                skip = False
        else:
            t = _type(ctx, w0, bm, 0)
        if t == INVALID:
            l2_index = (gc0 + i) % g.l2_entries
            ctx.corruption(f"Invalid cluster entry found (L2 offset: 0x{l2_off:x}, L2 index: 0x{l2_index:x})")
    if skip:
        return
    w0, bm = entries[0]
    sc = w_start >> g.sc_bits
    t = _type(ctx, w0, bm, sc)
    if not keep_old:
        if t == COMPRESSED:
            cs_from = 0
        elif t in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC):
            cs_from = min(sc, ctz32(bm)) << g.sc_bits if g.ext else 0
        else:
            cs_from = sc << g.sc_bits
    else:
        cs_from = w_start if t == NORMAL else sc << g.sc_bits
    w0, bm = entries[-1]
    sc = ((w_end - 1) & (cs - 1)) >> g.sc_bits
    t = _type(ctx, w0, bm, sc)
    r = -(-w_end // cs) * cs
    if not keep_old:
        if t == COMPRESSED:
            ce_to = r
        elif t in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC):
            ce_to = r - ((min(g.nsc - sc - 1, clz32(bm)) << g.sc_bits) if g.ext else 0)
        else:
            ce_to = -(-w_end // g.sc_size) * g.sc_size
    else:
        ce_to = w_end if t == NORMAL else -(-w_end // g.sc_size) * g.sc_size
    metas.insert(0, L2Meta(gc0 << g.cbits, host, nb, keep_old, cs_from, w_start, w_end, ce_to, l2_off, entries))


def _count_single_write(ctx: StepContext, gc0: int, n: int, new_alloc: bool) -> int:
    ext = ctx.g.ext
    expected = None
    for i in range(n):
        w0, _bm = ctx.entry(gc0 + i)
        if needs_new_alloc(w0, ext) != new_alloc:
            return i
        if not new_alloc:
            off = w0 & C.L2E_OFFSET_MASK
            if expected is not None and off != expected:
                return i
            expected = off + ctx.g.cs
    return n


def handle_copied(ctx: StepContext, start: int, need_host: int | None, nbytes: int,
                  metas: list[L2Meta]) -> tuple[int, int, int]:
    """(status, host offset, bytes): 1 = in-place piece; 0 with bytes 0 = stop; 0 = try handle_alloc."""
    g = ctx.g
    n = _nb_clusters(ctx, start, nbytes)
    l2_off = ctx.get_cluster_table(start)
    gc0 = start >> g.cbits
    w0, _bm = ctx.entry(gc0)
    if needs_new_alloc(w0, g.ext):
        return 0, -1, nbytes
    host = w0 & C.L2E_OFFSET_MASK
    if host & (g.cs - 1):
        ctx.corruption(f"Cluster allocation offset 0x{host:x} unaligned (L2 offset: 0x{l2_off:x}, "
                       f"L2 index: 0x{gc0 % g.l2_entries:x})")
    in_cluster = start & (g.cs - 1)
    if need_host is not None and host != need_host - in_cluster:
        return 0, -1, 0
    keep = _count_single_write(ctx, gc0, n, False)
    nbytes = min(nbytes, keep * g.cs - in_cluster)
    calculate_l2_meta(ctx, host, start, nbytes, l2_off, True, metas)
    return 1, host + in_cluster, nbytes


def handle_alloc(ctx: StepContext, start: int, need_host: int | None, nbytes: int,
                 metas: list[L2Meta]) -> tuple[int, int, int]:
    g = ctx.g
    n = _nb_clusters(ctx, start, nbytes)
    l2_off = ctx.get_cluster_table(start)
    gc0 = start >> g.cbits
    n = _count_single_write(ctx, gc0, n, True)
    if need_host is None:
        alloc = ctx.alloc.alloc_clusters(n)
        if alloc == 0:
            ctx.corruption("Preventing invalid allocation of data cluster at offset 0")
    else:
        alloc = need_host & ~(g.cs - 1)
        n = ctx.alloc.alloc_clusters_at(alloc, n)
        if n == 0:
            return 0, -1, 0
    ctx.trace.allocations.append((alloc, n * g.cs, "data"))
    in_cluster = start & (g.cs - 1)
    nbytes = min(nbytes, min(nbytes + in_cluster, n * g.cs) - in_cluster)
    calculate_l2_meta(ctx, alloc, start, nbytes, l2_off, False, metas)
    return 1, alloc + in_cluster, nbytes


def alloc_host_offset(ctx: StepContext, offset: int, nbytes: int) -> tuple[int, int, list[L2Meta]]:
    """qcow2_alloc_host_offset: (host offset, bytes of the host-contiguous prefix, L2Metas newest first)."""
    metas: list[L2Meta] = []
    start, remaining = offset, nbytes
    need_host: int | None = None
    host_offset = -1
    while remaining:
        ok, host, cur = handle_copied(ctx, start, need_host, remaining, metas)
        if not ok:
            if cur == 0:
                break
            ok, host, cur = handle_alloc(ctx, start, need_host, remaining, metas)
            if not ok:
                break
        if host_offset < 0:
            host_offset = host
        start += cur
        remaining -= cur
        need_host = host + cur
    return host_offset, nbytes - remaining, metas


# ---- COW ---------------------------------------------------------------------------------------------
def _segments(ctx: StepContext, offset: int, length: int) -> list[Segment]:
    return guestview.segments(ctx.chain, ctx, offset, offset + length) if length > 0 else []


def _is_zero_fast(ctx: StepContext, offset: int, length: int, segs: list[Segment]) -> bool:
    """bdrv_co_is_zero_fast over the chain (decides QEMU's zero-COW shortcut); a range reaching
    past the virtual size is never 'zero' (block status stops at the end)."""
    if length <= 0:
        return True
    if offset + length > ctx.g.size:
        return False
    return guestview.reads_as_zero(ctx.chain, segs, exact=False)


# perform_cow reads cow_start, the data area and cow_end with one read when the data area between the
# two regions is at most this long (its bytes are read and dropped: cheaper than two requests)
MERGE_READ_MAX: Final = 16384
Piece = tuple[int, int, int, list[L2Meta]]  # guest offset, bytes, host offset, its L2Metas
MAX_WORKERS: Final = 8  # QCOW2_MAX_WORKERS: pieces of one request in flight at once


def pwrite(ctx: StepContext, offset: int, nbytes: int, fill: Fill, kind: str) -> None:
    """qcow2_co_pwritev_part: the whole request, as host-contiguous pieces.

    A request of several pieces runs them as parallel tasks: QEMU allocates every piece before the
    first one finishes its I/O and links its L2 entries (which frees replaced clusters), so a
    cluster freed by piece 1 is not reused by piece 3 of the same request. Modelled as: allocate
    up to MAX_WORKERS pieces, then finish them in order. (A metadata cache miss in the middle of a
    request could let QEMU finish an earlier piece sooner; caches are warm in the cases tested.)
    """
    g = ctx.g
    pending: list[Piece] = []
    while nbytes:
        host, cur, metas = alloc_host_offset(ctx, offset, nbytes)
        if cur == 0:
            raise AssertionError("no progress allocating host clusters")
        for m in metas:  # handle_alloc_space: QEMU's zero-COW shortcut (recorded only)
            head_off, head_len = m.offset + m.cs_from, m.cs_to - m.cs_from
            tail_off, tail_len = m.offset + m.ce_from, m.ce_to - m.ce_from
            hsegs, tsegs = _segments(ctx, head_off, head_len), _segments(ctx, tail_off, tail_len)
            m.segs = (hsegs, tsegs)
            if (head_len or tail_len) and _is_zero_fast(ctx, head_off, head_len, hsegs) \
                    and _is_zero_fast(ctx, tail_off, tail_len, tsegs):
                m.skip = True
            elif head_len and tail_len and m.ce_from - m.cs_to <= MERGE_READ_MAX:
                # perform_cow reads both regions and the data area between them at once
                m.mid = _segments(ctx, m.offset + m.cs_to, m.ce_from - m.cs_to)
            if ctx.minimal_cow and g.ext:
                _minimal_regions(ctx, m)
        pending.append((offset, cur, host, metas))
        if len(pending) == MAX_WORKERS:
            _finish(ctx, pending.pop(0), fill, kind)
        offset += cur
        nbytes -= cur
    for piece in pending:
        _finish(ctx, piece, fill, kind)


def _minimal_regions(ctx: StepContext, m: L2Meta) -> None:
    """The minimal-COW policy's regions of `m` (minimal_cow.py; NOT QEMU): per cluster, only what
    must be preserved, with the guest view of each; zero-filled when every region reads as zeros."""
    g = ctx.g
    cs = g.cs
    regions: list[tuple[int, int, list[Segment]]] = []
    for i in range(m.nb):
        w0, bm = m.old[i]
        base = i * cs
        wf, wt = max(m.cs_to, base) - base, min(m.ce_from, base + cs) - base
        mc = minimal_cow(bm, compressed=bool(w0 & C.QCOW_OFLAG_COMPRESSED), keep_old=m.keep_old, w_from=wf,
                         w_to=wt, cluster_size=cs, nsc=g.nsc)
        for a, b in mc.regions:
            regions.append((base + a, base + b, _segments(ctx, m.offset + base + a, b - a)))
    m.regions = regions
    m.mid = None
    m.skip = bool(regions) and all(_is_zero_fast(ctx, m.offset + a, b - a, segs) for a, b, segs in regions)


def _finish(ctx: StepContext, piece: Piece, fill: Fill, kind: str) -> None:
    """qcow2_co_pwritev_task: data (merged with the COW when it can), then link every L2Meta."""
    g = ctx.g
    offset, cur, host, metas = piece
    merged = None
    for m in metas:
        if m.cs_to == m.cs_from and m.ce_to == m.ce_from:
            continue
        if m.skip or m.regions is not None:
            continue
        if m.offset + m.cs_to == offset and m.offset + m.ce_from == offset + cur:
            merged = m
            m.merged = True
            break
    txn = ctx.txn
    through = txn.data_through
    if through:
        for m in metas:  # handle_alloc_space: the clusters are zeroed first, the COW is skipped
            if m.skip:
                txn.zero_range(m.alloc + m.cs_from, m.ce_to - m.cs_from)
    if merged is None:
        txn.write_data(host, cur, "data", fill(offset, cur) if through else None)
    for m in metas:
        link_l2(ctx, m, merged is m, host, offset, cur, fill)
    ctx.trace.requests.append((kind, offset, cur, "", host, metas[::-1]))
    for gc in range(offset >> g.cbits, (offset + cur - 1 >> g.cbits) + 1):
        ctx.touch(gc)


def _cow(ctx: StepContext, m: L2Meta, at: int, guest: int, length: int, segs: list[Segment]) -> None:
    """One COW region (guest [guest, guest+length)) to host offset `at`. A skip_cow meta's COW
    bytes are the zeros _finish put there: recorded, not written again."""
    if not length:
        return
    txn = ctx.txn
    if m.skip:
        txn.record(at, length, "cow")
    elif txn.data_through:
        top_pread = txn.pread if txn.pages and not txn.applying else None
        data = guestview.read(ctx.chain, segs, guest, guest + length, ctx.decompressed, top_pread)
        txn.write_data(at, length, "cow", data)
    else:
        txn.write_data(at, length, "cow", None)


def link_l2(ctx: StepContext, m: L2Meta, merged: bool, host: int, data_off: int, data_len: int,
            fill: Fill) -> None:
    """perform_cow + qcow2_alloc_cluster_link_l2 for one L2Meta."""
    g = ctx.g
    hsegs, tsegs = m.segs
    txn = ctx.txn

    if m.regions is not None:  # the minimal policy (NOT QEMU): its own regions, then its bitmaps
        for a, b, segs in m.regions:
            _cow(ctx, m, m.alloc + a, m.offset + a, b - a, segs)
        _link_minimal(ctx, m)
        return
    _cow(ctx, m, m.alloc + m.cs_from, m.offset + m.cs_from, m.cs_to - m.cs_from, hsegs)
    if merged:
        txn.write_data(host, data_len, "data", fill(data_off, data_len) if txn.data_through else None)
    _cow(ctx, m, m.alloc + m.ce_from, m.offset + m.ce_from, m.ce_to - m.ce_from, tsegs)
    gc0 = m.offset >> g.cbits
    old_entries = []
    written_from, written_to = m.cs_from, m.ce_to
    txn.op(L2_AFTER_REFCOUNT)  # refcounts reach the disk before an L2 entry points at new clusters
    for i in range(m.nb):
        w0, bm = ctx.entry(gc0 + i)
        if w0:
            old_entries.append(w0)
        new_w0 = (m.alloc + i * g.cs) | C.QCOW_OFLAG_COPIED
        new_bm = bm
        if g.ext:
            wf = max(written_from, i * g.cs)
            wt = min(written_to, (i + 1) * g.cs)
            first = (wf - i * g.cs) >> g.sc_bits
            last = (wt - 1 - i * g.cs) >> g.sc_bits
            mask = (1 << (last + 1)) - (1 << first)
            new_bm = (bm | mask) & ~(mask << 32)
        ctx.set_entry(m.l2_off, gc0 + i, new_w0, new_bm)
    if not m.keep_old:
        for w0 in old_entries:
            ctx.alloc.free_any_cluster(w0)
    else:
        ctx.in_place.append((m.alloc, m.nb))


def _link_minimal(ctx: StepContext, m: L2Meta) -> None:
    """link_l2 under the minimal policy: the written subclusters become `N`, every other keeps its
    old state (`-` stays `-`, `0` stays `0`, a moved `N` stays `N`); old clusters freed as QEMU does."""
    g = ctx.g
    cs = g.cs
    gc0 = m.offset >> g.cbits
    old_entries = []
    ctx.txn.op(L2_AFTER_REFCOUNT)
    for i in range(m.nb):
        w0, bm = ctx.entry(gc0 + i)
        if w0:
            old_entries.append(w0)
        base = i * cs
        wf, wt = max(m.cs_to, base) - base, min(m.ce_from, base + cs) - base
        new_bm = minimal_cow(bm, compressed=bool(w0 & C.QCOW_OFLAG_COMPRESSED), keep_old=m.keep_old, w_from=wf,
                             w_to=wt, cluster_size=cs, nsc=g.nsc).bitmap_after
        ctx.set_entry(m.l2_off, gc0 + i, (m.alloc + base) | C.QCOW_OFLAG_COPIED, new_bm)
    if not m.keep_old:
        for w0 in old_entries:
            ctx.alloc.free_any_cluster(w0)
    else:
        ctx.in_place.append((m.alloc, m.nb))
