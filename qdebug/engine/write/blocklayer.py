"""The generic block layer's request splitting, shared by discard and write-zeroes.

bdrv_co_pdiscard and bdrv_co_do_pwrite_zeroes cut a request at the driver's alignment into an
unaligned head piece, an aligned body and an unaligned tail piece before qcow2 sees any of it.
"""

from __future__ import annotations


def block_piece(offset: int, nbytes: int, align: int, tail: int) -> int:
    """Length of the next piece of [offset, offset+nbytes) for a request whose end lies `tail`
    bytes past an `align` boundary: up to the boundary while unaligned, then the aligned body,
    then the tail."""
    head = offset % align
    if head:
        return min(nbytes, align - head)
    if tail and nbytes > align:
        return nbytes - tail
    return nbytes
