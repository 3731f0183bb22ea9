"""Compressed writes (`write -c`): whole clusters only, each compressed with the image's type into
at most cluster_size - 1 bytes (else QEMU writes it uncompressed through the normal path), refused
with EIO when the cluster already has a host offset, packed byte-wise after the previous compressed
cluster of the same process (qcow2_alloc_bytes). QEMU trusts its remembered packing offset even
after that host cluster was freed and reused: the step is then flagged as a hazard.
"""

from __future__ import annotations

from functools import lru_cache

from ..format import constants as C
from ..format.compression import compress, make_descriptor
from .context import StepContext, StepFailed
from .datapath import pwrite
from .plan import Hazard
from .txn import Data, Fill


@lru_cache(maxsize=64)
def _compressed_fill(byte: int, length: int, cluster_size: int, ctype: int) -> bytes:
    return compress(bytes([byte]) * length + bytes(cluster_size - length), ctype)


def write_compressed(ctx: StepContext, offset: int, nbytes: int, byte: int, owners, data: Fill | None = None) -> None:
    """`data` gives the guest bytes when they are not all `byte` (qemu-io write -c -s FILE)."""
    g = ctx.g
    if offset & (g.cs - 1):
        raise StepFailed("Invalid argument")
    if nbytes & (g.cs - 1) and offset + nbytes != g.size:
        raise StepFailed("Invalid argument")
    while nbytes:
        chunk = min(nbytes, g.cs)
        _one_cluster(ctx, offset, chunk, byte, owners, data)
        offset += chunk
        nbytes -= chunk


def _one_cluster(ctx: StepContext, offset: int, chunk: int, byte: int, owners, plain: Fill | None) -> None:
    g = ctx.g
    if plain is None:
        data = _compressed_fill(byte, chunk, g.cs, g.compression_type)
        plain = _byte_fill(byte)
    else:  # the last cluster of an image whose size is not a multiple of it: zero-padded, as QEMU does
        data = compress(_joined(plain(offset, chunk)) + bytes(g.cs - chunk), g.compression_type)
    if len(data) > g.cs - 1:
        ctx.trace.notes.append(f"guest 0x{offset:x}: compressed data does not fit in {g.cs - 1} bytes, written uncompressed")
        pwrite(ctx, offset, chunk, plain, "write")
        return
    l2_off = ctx.get_cluster_table(offset)
    gc = offset >> g.cbits
    w0, _bm = ctx.entry(gc)
    if w0 & C.L2E_OFFSET_MASK:
        ctx.trace.request("compressed", offset, chunk, "EIO: the cluster is already allocated")
        raise StepFailed("Input/output error")
    host = ctx.alloc.alloc_bytes(len(data))
    ctx.trace.allocations.append((host, len(data), "compressed data"))
    if ctx.alloc.stale_pack:
        meta = ctx.metadata_overlap(host, len(data))
        if meta:
            # QEMU's overlap check stops the write and marks the image corrupt; the refcount and
            # L2 updates of this write stay in its caches, which are never written after that.
            first, last = host >> g.cbits, (host + len(data) - 1) >> g.cbits
            ctx.alloc.update_refcount(first, last - first + 1, -1, undo=True)
            ctx.corruption(f"Preventing invalid write on metadata (overlaps with {meta})")
        hz = owners(host, len(data))
        if hz is not None:
            ctx.trace.hazards.append(hz)
    ctx.set_entry(l2_off, gc, make_descriptor(host, len(data), g.cbits), 0)
    ctx.txn.write_data(host, len(data), "data", data)
    ctx.trace.request("compressed", offset, chunk, f"{len(data)} bytes packed", host)


def _byte_fill(byte: int) -> Fill:
    return lambda _o, n: bytes([byte]) * n


def _joined(data: Data) -> bytes:
    return b"".join(bytes(p) for p in data) if isinstance(data, list) else bytes(data)


def hazard_for(owner: str, guest_range: tuple[int, int] | None, host: int, length: int) -> Hazard:
    where = f"guest [0x{guest_range[0]:x}, 0x{guest_range[1]:x})" if guest_range else owner
    return Hazard(host, length, owner, guest_range,
                  f"hazard: host write [0x{host:x}, +0x{length:x}) lands in a cluster owned by {owner}: "
                  f"QEMU 7.2 corrupts {where}")
