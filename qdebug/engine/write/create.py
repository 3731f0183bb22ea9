"""`create_image`: a new qcow2 image laid out byte for byte as `qemu-img create` 7.2 lays it out.

QEMU writes cluster 0 (header), a one-cluster refcount table at cluster 1 pointing at an empty
refcount block at cluster 2, allocates clusters 0-2 through the normal allocator, then grows the
L1 table to the virtual size (first fit: cluster 3 on, extra refcount blocks after it when the
L1 is big) and rewrites the header. Doing the same steps with the same allocator gives the same
bytes, including the large-L1 cases.
"""

from __future__ import annotations

import os

from ..errors import QcowError
from ..file.fileio import pwrite_all
from ..file.image import open_image
from ..format import constants as C
from ..format.header import build_header
from .allocator import Allocator
from .txn import Txn, WriteMode

COMPRESSION_TYPES = {"zlib": C.QCOW2_COMPRESSION_TYPE_ZLIB, "zstd": C.QCOW2_COMPRESSION_TYPE_ZSTD}


def _validate(size: int, cluster_size: int, extended_l2: bool, refcount_bits: int, compression_type: str) -> int:
    if size < 0:
        raise QcowError(f"image size {size} is negative")
    if cluster_size < 512 or cluster_size > 1 << C.MAX_CLUSTER_BITS or cluster_size & (cluster_size - 1):
        raise QcowError(f"cluster size {cluster_size}: must be a power of two between 512 and 2M")
    if extended_l2 and cluster_size < 16384:
        raise QcowError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise QcowError(f"refcount_bits {refcount_bits}: must be a power of two up to 64")
    if compression_type not in COMPRESSION_TYPES:
        raise QcowError(f"compression_type {compression_type!r}: must be zlib or zstd")
    return refcount_bits.bit_length() - 1


def create_image(path: str, size: int, *, cluster_size: int = 65536, extended_l2: bool = True,
                 refcount_bits: int = 16, compression_type: str = "zlib", backing: str | None = None,
                 backing_format: str | None = None) -> None:
    """Create `path` (overwriting it) as `qemu-img create -f qcow2 -o ...` would."""
    order = _validate(size, cluster_size, extended_l2, refcount_bits, compression_type)
    ctype = COMPRESSION_TYPES[compression_type]
    size = -(-size // 512) * 512
    cbits = cluster_size.bit_length() - 1
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l1_size = -(-(-(-size // cluster_size)) // l2_entries)
    if l1_size * 8 > C.QCOW_MAX_L1_SIZE:
        raise QcowError("The image size is too large (try using a larger cluster size)")
    if backing is not None:
        bpath = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(path) or ".", backing)
        if not os.path.exists(bpath):
            raise QcowError(f"backing file {backing!r} not found (looked for {bpath})")
        if backing_format not in (None, "raw", "qcow2"):
            raise QcowError(f"backing format {backing_format!r}: qcow2 and raw are supported")

    def header(l1_entries: int, l1_offset: int, with_backing: bool, reftable: tuple[int, int] = (1, 1)) -> bytes:
        return build_header(cluster_bits=cbits, size=size if with_backing or l1_entries else 0,
                            l1_size=l1_entries, l1_table_offset=l1_offset,
                            refcount_table_offset=reftable[0] * cluster_size, refcount_table_clusters=reftable[1],
                            refcount_order=order, extended_l2=extended_l2, compression_type=ctype,
                            backing_file=backing if with_backing else None,
                            backing_format=backing_format if with_backing else None)

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise QcowError(f"{path}: cannot create: {e.strerror}") from None
    try:
        cluster0 = header(0, 0, False).ljust(cluster_size, b"\0")
        reftable = (2 * cluster_size).to_bytes(8, "big").ljust(cluster_size, b"\0")
        pwrite_all(fd, cluster0 + reftable + bytes(cluster_size), 0, path)
    finally:
        os.close(fd)
    img = open_image(path, writable=True)
    try:
        txn = Txn(img, WriteMode.EXECUTE, {}, 0)
        alloc = Allocator(txn)
        alloc.alloc_clusters(3)
        l1_offset = 0
        if l1_size:
            l1_bytes = l1_size * 8
            l1_offset = alloc.alloc_clusters(-(-(-(-l1_bytes // 512) * 512) // cluster_size))
            txn.write_meta(l1_offset, bytes(l1_bytes), "L1")
        # (a big L1 may have grown the refcount table: the header then points at the new one)
        reftable = (alloc.reftable_offset // cluster_size, alloc.reftable_len * 8 // cluster_size)
        txn.write_meta(0, header(l1_size, l1_offset, True, reftable), "header")
    finally:
        img.close()
