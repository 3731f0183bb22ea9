"""`create_image`: a new qcow2 image laid out byte for byte as `qemu-img create` 7.2 lays it out.

QEMU (qcow2_co_create) writes cluster 0 (header), a one-cluster refcount table at cluster 1
pointing at an empty refcount block at cluster 2, allocates clusters 0-2 through the normal
allocator, then truncates the empty image to its size: the L1 table grows (first fit: cluster 3
on, extra refcount blocks after it when the L1 is big), and preallocation runs:

- metadata (preallocate_co): qcow2_alloc_host_offset over the whole disk, request by request
  (L2 tables and data clusters interleaved as any write allocates them), entries linked without
  touching the subcluster bitmaps, the file extended (sparse) to the last data cluster;
- falloc / full: a new refcount area at the end of the file (qcow2_refcount_area, exact size,
  covering every data cluster and L2 table to come; the old one-cluster refcount table is freed),
  the data clusters reserved after it in one run, the file extended by fallocate (falloc) or by
  writing zeros (full), and the L2 entries linked one L2 slice at a time (their tables, allocated
  last, reuse the freed cluster 1 first).

The backing file, if any, is recorded last. Doing the same steps with the same allocator and the
same write path gives the same bytes; the protocol options (nocow, extent_size_hint) are file
attributes set best-effort, as file-posix sets them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct

from ..errors import QcowError
from ..file.chain import open_chain
from ..file.fileio import pwrite_all
from ..format import constants as C
from ..format.geometry import Geometry
from ..format.header import FIELD, V2_HEADER_LENGTH, Header, build_header, pack_header_fields
from .allocator import Allocator
from .context import StepContext
from .datapath import alloc_host_offset
from .ops import Command
from .step import StepTrace
from .txn import Txn, WriteMode

COMPRESSION_TYPES = {"zlib": C.QCOW2_COMPRESSION_TYPE_ZLIB, "zstd": C.QCOW2_COMPRESSION_TYPE_ZSTD}
PREALLOCATION = ("off", "metadata", "falloc", "full")
_INT_MAX = (1 << 31) - 1
_LAZY_REFCOUNTS = 1  # compatible feature bit 0


def _validate(size: int, cluster_size: int, extended_l2: bool, refcount_bits: int, compression_type: str,
              version: int, lazy_refcounts: bool, preallocation: str, backing: str | None,
              backing_format: str | None) -> int:
    """qcow2_co_create's checks, in its order and with its messages; the refcount order."""
    if size < 0:
        raise QcowError(f"image size {size} is negative")
    if preallocation not in PREALLOCATION:
        raise QcowError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if version not in (2, 3):
        raise QcowError(f"Parameter 'version' does not accept value '{version}'")
    if compression_type not in COMPRESSION_TYPES:
        raise QcowError(f"Parameter 'compression-type' does not accept value '{compression_type}'")
    if extended_l2 and version < 3:
        raise QcowError("Extended L2 entries are only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)")
    if cluster_size < 512 or cluster_size > 1 << C.MAX_CLUSTER_BITS or cluster_size & (cluster_size - 1):
        raise QcowError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise QcowError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if backing is not None and preallocation != "off" and not extended_l2:
        raise QcowError("Backing file and preallocation can only be used at the same time if extended_l2 is on")
    if backing_format is not None and backing is None:
        raise QcowError("Backing format cannot be used without backing file")
    if lazy_refcounts and version < 3:
        raise QcowError("Lazy refcounts only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise QcowError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise QcowError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                        "(use version=v3 or greater)")
    if compression_type != "zlib" and version < 3:
        raise QcowError("Non-zlib compression type is only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)")
    return refcount_bits.bit_length() - 1


def _ext(magic: int, data: bytes) -> bytes:
    return struct.pack(">II", magic, len(data)) + data + bytes(-len(data) % 8)


def _header(*, version: int, cluster_bits: int, size: int, l1_size: int, l1_offset: int, reftable: tuple[int, int],
            order: int, extended_l2: bool, ctype: int, lazy_refcounts: bool, backing: str | None,
            backing_format: str | None) -> bytes:
    """Cluster 0 as qcow2_update_header writes it (v2: the 72-byte header and no feature table)."""
    if version == 3:
        out = bytearray(build_header(cluster_bits=cluster_bits, size=size, l1_size=l1_size, l1_table_offset=l1_offset,
                                     refcount_table_offset=reftable[0], refcount_table_clusters=reftable[1],
                                     refcount_order=order, extended_l2=extended_l2, compression_type=ctype,
                                     backing_file=backing, backing_format=backing_format))
        if lazy_refcounts:
            compat = FIELD["compatible_features"]
            out[compat.offset:compat.offset + compat.width] = compat.pack(_LAZY_REFCOUNTS)
        return bytes(out)
    body = (_ext(C.QCOW2_EXT_MAGIC_BACKING_FORMAT, backing_format.encode()) if backing_format else b"") + bytes(8)
    name = backing.encode() if backing else b""
    bfo = V2_HEADER_LENGTH + len(body) if name else 0
    hdr = Header(C.QCOW_MAGIC, 2, bfo, len(name), cluster_bits, size, 0, l1_size, l1_offset, reftable[0], reftable[1],
                 0, 0)
    return pack_header_fields(hdr) + body + name


def _file_hints(fd: int, nocow: bool, extent_size_hint: int | None) -> str | None:
    """file-posix's create: FS_NOCOW_FL when asked, and the extent size hint (default 1 MiB);
    failures are not errors. Returns the warning QEMU prints (an explicit hint it could not set)."""
    if nocow:
        try:
            flags = bytearray(4)
            fcntl.ioctl(fd, 0x80086601, flags)  # FS_IOC_GETFLAGS
            struct.pack_into("=I", flags, 0, struct.unpack("=I", flags)[0] | 0x00800000)  # FS_NOCOW_FL
            fcntl.ioctl(fd, 0x40086602, flags)  # FS_IOC_SETFLAGS
        except OSError:
            pass
    hint = 1 << 20 if extent_size_hint is None else extent_size_hint
    try:
        attr = bytearray(28)
        fcntl.ioctl(fd, 0x801C581F, attr)  # FS_IOC_FSGETXATTR
        xflags = struct.unpack_from("=I", attr, 0)[0] | 0x800  # FS_XFLAG_EXTSIZE
        struct.pack_into("=II", attr, 0, xflags, hint)
        fcntl.ioctl(fd, 0x401C5820, attr)  # FS_IOC_FSSETXATTR
    except OSError as e:
        if extent_size_hint:
            return f"Failed to set extent size hint: {e.strerror}"
    return None


def create_image(path: str, size: int, *, cluster_size: int = 65536, extended_l2: bool = True,
                 refcount_bits: int = 16, compression_type: str = "zlib", backing: str | None = None,
                 backing_format: str | None = None, version: int = 3, lazy_refcounts: bool = False,
                 preallocation: str = "off", nocow: bool = False, extent_size_hint: int | None = None) -> list[str]:
    """Create `path` (overwriting it) as `qemu-img create -f qcow2 -o ...` would; returns the
    warnings qemu-img would print."""
    order = _validate(size, cluster_size, extended_l2, refcount_bits, compression_type, version, lazy_refcounts,
                      preallocation, backing, backing_format)
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

    def header(l1_entries: int, l1_offset: int, reftable: tuple[int, int], with_backing: bool, sz: int) -> bytes:
        return _header(version=version, cluster_bits=cbits, size=sz, l1_size=l1_entries, l1_offset=l1_offset,
                       reftable=reftable, order=order, extended_l2=extended_l2, ctype=ctype,
                       lazy_refcounts=lazy_refcounts, backing=backing if with_backing else None,
                       backing_format=backing_format if with_backing else None)

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise QcowError(f"{path}: cannot create: {e.strerror}") from None
    try:  # as QEMU's create: one that fails leaves no file behind
        try:
            warning = _file_hints(fd, nocow, extent_size_hint)
            cluster0 = header(0, 0, (cluster_size, 1), False, 0).ljust(cluster_size, b"\0")
            reftable0 = (2 * cluster_size).to_bytes(8, "big").ljust(cluster_size, b"\0")
            pwrite_all(fd, cluster0 + reftable0 + bytes(cluster_size), 0, path)
        finally:
            os.close(fd)
        # The image as QEMU reopens it to grow it: no backing file yet (recorded at the very end).
        chain = open_chain(path, writable=True, no_backing=True)
        try:
            img = chain.top
            txn = Txn(img, WriteMode.EXECUTE, {}, 0)
            alloc = Allocator(txn)
            alloc.alloc_clusters(3)
            l1_offset = 0
            if l1_size:
                l1_bytes = l1_size * 8
                l1_offset = alloc.alloc_clusters(-(-(-(-l1_bytes // 512) * 512) // cluster_size))
                txn.write_meta(l1_offset, bytes(l1_bytes), "L1")
            if preallocation != "off":
                txn.write_meta(0, header(l1_size, l1_offset, _reftable(alloc), False, size), "header")
                img.reload_header()
                geo = Geometry(img.header, size)
                geo.slice_entries = geo.l2_entries  # opened at size 0: a cache of whole tables
                trace = StepTrace(Command("write", 0, size), geo.ext, txn.writes, txn.file_size)
                ctx = StepContext(chain, geo, False, txn, alloc, trace)
                if preallocation == "metadata":
                    _preallocate_metadata(ctx, size)
                else:
                    _preallocate_data(ctx, size, preallocation)
            # (a big L1 or a preallocated refcount area may have moved the refcount table)
            txn.write_meta(0, header(l1_size, l1_offset, _reftable(alloc), True, size), "header")
        finally:
            chain.close()
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return [warning] if warning else []


def _reftable(alloc: Allocator) -> tuple[int, int]:
    return alloc.reftable_offset, alloc.reftable_len * 8 // alloc.cs


def _link_preallocated(ctx: StepContext, l2_off: int, guest: int, host: int, nb: int) -> None:
    """qcow2_alloc_cluster_link_l2 for a preallocation: COPIED entries, bitmaps left alone."""
    g = ctx.g
    gc0 = guest >> g.cbits
    for i in range(nb):
        _w0, bm = ctx.entry(gc0 + i)
        ctx.set_entry(l2_off, gc0 + i, (host + i * g.cs) | C.QCOW_OFLAG_COPIED, bm)


def _preallocate_metadata(ctx: StepContext, size: int) -> None:
    """preallocate_co: allocate like a write of the whole disk that writes no data."""
    g = ctx.g
    offset = host = cur = 0
    while offset < size:
        host, cur, metas = alloc_host_offset(ctx, offset, min(size - offset, _INT_MAX // g.cs * g.cs))
        for m in metas:  # (newest first, as qcow2_handle_l2meta links them)
            for start, end in ((m.cs_from, m.cs_to), (m.ce_from, m.ce_to)):
                if end > start:  # perform_cow of a fresh image: zeros (the file gets them)
                    ctx.txn.write_data(m.alloc + start, end - start, "cow", bytes(end - start))
            _link_preallocated(ctx, m.l2_off, m.offset, m.alloc, m.nb)
        offset += cur
    if host + cur > ctx.txn.img.file_size:
        ctx.txn.img.truncate(host + cur)


def _preallocate_data(ctx: StepContext, size: int, mode: str) -> None:
    """qcow2_co_truncate's falloc / full preallocation of an empty image."""
    g = ctx.g
    alloc = ctx.alloc
    img = ctx.txn.img
    file_size = img.file_size
    last = -(-file_size // g.cs) - 1
    while last >= 0 and alloc.get_refcount(last) == 0:
        last -= 1
    old_end = (last + 1) * g.cs
    nb_data = -(-size // g.cs)
    nb_l2 = -(-nb_data // (g.cs // g.esize)) + 1
    start = alloc.refcount_area(old_end, nb_data + nb_l2)
    if nb_data and alloc.alloc_clusters_at(start, nb_data) != nb_data:
        raise QcowError("preallocation: the data area after the refcount structures is not free")
    new_size = start + nb_data * g.cs
    current = img.file_size
    if new_size > current:
        if mode == "falloc":  # file-posix: fallocate from the current end
            os.posix_fallocate(img.fd, current, new_size - current)
            img.truncate(new_size)
        else:  # file-posix: the new length first, then zeros written from the current end
            img.truncate(new_size)
            zeros = bytes(65536)
            for off in range(current, new_size, 65536):
                img.pwrite(off, zeros[:min(65536, new_size - off)])
    guest, host = 0, start
    while nb_data:
        nb = min(nb_data, g.slice_entries - (guest >> g.cbits) % g.slice_entries)
        _link_preallocated(ctx, ctx.get_cluster_table(guest), guest, host, nb)
        guest += nb * g.cs
        host += nb * g.cs
        nb_data -= nb
