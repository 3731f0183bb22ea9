"""Zero writes (`write -z [-u]`): the block layer's head/body/tail split at subcluster alignment,
qcow2_co_pwrite_zeroes (a partial subcluster only if the rest already reads as zero and the
subcluster is unallocated or zero), qcow2_subcluster_zeroize (zero_l2_subclusters for partial
clusters, zero_in_l2_slice for whole ones, here zero_whole_clusters) and the ENOTSUP fallback to
writing real zeros of the whole piece through the data path, as QEMU 7.2 does.
"""

from __future__ import annotations

from ..format import constants as C
from ..format.subclusters import INVALID, UNALLOCATED_ALLOC, UNALLOCATED_PLAIN, ZERO_ALLOC, ZERO_PLAIN, subcluster_type
from ..format.subclusters import SubclusterType as T
from ..read import guestview
from .blocklayer import block_piece
from .context import StepContext, StepFailed
from .datapath import pwrite

MAX_BOUNCE = 32768 << 9  # MAX_BOUNCE_BUFFER: the fallback writes at most 16 MiB at a time


class _NotSup(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _zeros(_off: int, n: int) -> bytes:
    return bytes(n)


def write_zeroes(ctx: StepContext, offset: int, nbytes: int, unmap: bool, no_fallback: bool = False) -> None:
    """bdrv_co_do_pwrite_zeroes with qcow2's pwrite_zeroes_alignment = subcluster size.

    `no_fallback` (qemu-io write -z -n, BDRV_REQ_NO_FALLBACK): a piece QEMU cannot zero in the
    L2 table fails the request with ENOTSUP (the pieces before it stay zeroed); v2 images do not
    offer the flag at all."""
    g = ctx.g
    if no_fallback and g.version < 3:
        raise StepFailed("Operation not supported")
    align = g.sc_size
    tail = (offset + nbytes) % align
    max_zero = ((1 << 31) - 1) // align * align
    while nbytes > 0:
        num = min(block_piece(offset, nbytes, align, tail), max_zero)
        try:
            pwrite_zeroes(ctx, offset, num, unmap)
            ctx.trace.request("zero", offset, num, "zeroed in the L2 table")
        except _NotSup as e:
            if no_fallback:
                ctx.trace.request("zero", offset, num, f"ENOTSUP ({e.why}): -n allows no fallback")
                raise StepFailed("Operation not supported") from None
            num = min(num, MAX_BOUNCE)
            ctx.trace.request("zero", offset, num, f"ENOTSUP ({e.why}): real zeros written")
            pwrite(ctx, offset, num, _zeros, "zero-fallback")
        offset += num
        nbytes -= num


def is_zero(ctx: StepContext, offset: int, nbytes: int) -> bool:
    """QEMU's is_zero(): exact block status through the chain, clamped to the image end."""
    end = min(offset + nbytes, ctx.g.size)
    if offset >= end:
        return True
    return guestview.reads_as_zero(ctx.chain, guestview.segments(ctx.chain, ctx, offset, end), exact=True)


def pwrite_zeroes(ctx: StepContext, offset: int, nbytes: int, unmap: bool) -> None:
    """qcow2_co_pwrite_zeroes: raises _NotSup where QEMU returns -ENOTSUP."""
    g = ctx.g
    head = offset % g.sc_size
    tail = -(-(offset + nbytes) // g.sc_size) * g.sc_size - (offset + nbytes)
    if offset + nbytes == g.size:
        tail = 0
    if head or tail:
        if not (is_zero(ctx, offset - head, head) and is_zero(ctx, offset + nbytes, tail)):
            raise _NotSup("the rest of the subcluster does not read as zero")
        offset -= head
        nbytes = g.sc_size
        gc = offset >> g.cbits
        w0, bm = ctx.entry(gc)
        t = subcluster_type(w0, bm, (offset & (g.cs - 1)) >> g.sc_bits, extended=g.ext)
        if t == INVALID:
            _l1e, l2_off, idx = ctx.l2_location(gc)
            ctx.corruption(f"Invalid cluster entry found (L2 offset: 0x{l2_off:x}, L2 index: 0x{idx:x})")
        if t not in (UNALLOCATED_PLAIN, UNALLOCATED_ALLOC, ZERO_PLAIN, ZERO_ALLOC):
            raise _NotSup(f"subcluster is {T(t).name}")
    subcluster_zeroize(ctx, offset, nbytes, unmap)


def subcluster_zeroize(ctx: StepContext, offset: int, nbytes: int, unmap: bool) -> None:
    g = ctx.g
    end = offset + nbytes
    if g.version < 3:
        if not ctx.has_backing:
            from .discard import cluster_discard
            cluster_discard(ctx, offset, nbytes)
            return
        raise _NotSup("v2 image with a backing file")
    head = min(end, -(-offset // g.cs) * g.cs) - offset
    offset += head
    tail = 0 if end >= g.size else end - max(offset, end & ~(g.cs - 1))
    end -= tail
    if head:
        zero_l2_subclusters(ctx, offset - head, -(-head // g.sc_size))
    if end > offset:
        zero_whole_clusters(ctx, offset, -(-(end - offset) // g.cs), unmap)
    if tail:
        zero_l2_subclusters(ctx, end, -(-tail // g.sc_size))


def zero_l2_subclusters(ctx: StepContext, offset: int, count: int) -> None:
    g = ctx.g
    sc = (offset & (g.cs - 1)) >> g.sc_bits
    l2_off = ctx.get_cluster_table(offset)
    gc = offset >> g.cbits
    w0, bm = ctx.entry(gc)
    if w0 & C.QCOW_OFLAG_COMPRESSED:
        raise _NotSup("cannot zero part of a compressed cluster")
    mask = (1 << (sc + count)) - (1 << sc)
    new_bm = (bm | (mask << 32)) & ~mask
    if new_bm != bm:
        ctx.set_entry(l2_off, gc, w0, new_bm)


def zero_whole_clusters(ctx: StepContext, offset: int, nb: int, unmap: bool) -> None:
    """zero_in_l2_slice: whole clusters read as zero; compressed ones (and allocated ones with
    MAY_UNMAP) lose their host cluster."""
    g = ctx.g

    def rule(w0: int, bm: int) -> tuple[int, int, bool]:
        compressed = bool(w0 & C.QCOW_OFLAG_COMPRESSED)
        drop = compressed or (unmap and bool(w0 & C.L2E_OFFSET_MASK))
        new_w0 = 0 if drop else w0
        if g.ext:
            return new_w0, C.BITMAP_ALL_ZEROES, drop
        return new_w0 | C.QCOW_OFLAG_ZERO, bm, drop

    ctx.rewrite_whole_clusters(offset, nb, rule)
