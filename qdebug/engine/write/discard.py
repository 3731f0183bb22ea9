"""Discard (`discard OFF LEN`, a guest UNMAP) as QEMU 7.2 does it: whole clusters only (partial
clusters are ENOTSUP, silently ignored, except the last partial cluster of an unaligned image),
then discard_in_l2_slice's v3 rule: with a backing file or an allocated cluster the entry becomes
"reads as zero" with no host cluster; an unallocated cluster without backing stays as it is.
"""

from __future__ import annotations

from ..format import constants as C
from .blocklayer import block_piece
from .context import StepContext


def discard(ctx: StepContext, offset: int, nbytes: int) -> None:
    """bdrv_co_pdiscard with pdiscard_alignment = cluster size, then qcow2_co_pdiscard per piece."""
    g = ctx.g
    align = g.cs
    tail = (offset + nbytes) % align
    while nbytes > 0:
        num = block_piece(offset, nbytes, align, tail)
        aligned = not (offset | num) % align
        if not aligned and not (offset % align == 0 and offset + num == g.size):
            ctx.trace.request("discard", offset, num, "ENOTSUP: not whole clusters, ignored")
        elif g.version < 3 and ctx.has_backing:
            ctx.trace.request("discard", offset, num, "ENOTSUP: v2 image with a backing file, ignored")
        else:
            ctx.trace.request("discard", offset, num, "discarded")
            cluster_discard(ctx, offset, num)
        offset += num
        nbytes -= num


def cluster_discard(ctx: StepContext, offset: int, nbytes: int) -> None:
    """qcow2_cluster_discard with a normal (not full) discard: discard_in_l2_slice's v3 rule."""
    g = ctx.g

    def rule(w0: int, bm: int) -> tuple[int, int, bool]:
        allocated = bool(w0 & C.QCOW_OFLAG_COMPRESSED) or bool(w0 & C.L2E_OFFSET_MASK)
        if not (ctx.has_backing or allocated):
            return w0, bm, True
        if g.ext:
            return 0, C.BITMAP_ALL_ZEROES, True
        return (C.QCOW_OFLAG_ZERO if g.version >= 3 else 0), bm, True

    ctx.rewrite_whole_clusters(offset, -(-nbytes // g.cs), rule)
