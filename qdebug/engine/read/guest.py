"""Guest reads through the backing chain, exactly as QEMU 7.2 answers them: block status of every
layer stacked top-down (`status.resolve`), then each piece read from the layer that answers it
(decompressed where compressed); an invalid L2 entry fails the read as QEMU does (EIO)."""

from __future__ import annotations

import numpy as np

from ..errors import CorruptImage, InvalidEntry
from ..file.chain import Chain
from ..file.image import Image
from ..format import constants as C
from ..format.compression import decompress, descriptor_fields
from ..format.subclusters import SubclusterType as T
from .kinds import RAW_DATA
from .status import Resolved, layer_runs, resolve


def resolve_chain(chain: Chain, start: int, end: int, *, for_map: bool = False) -> Resolved:
    """Guest range -> the pieces each layer answers (see status.resolve)."""
    runs = [layer_runs(layer, start, end, seek_holes=for_map) for layer in chain.layers]
    return resolve(runs, [layer.size for layer in chain.layers], start, end)


def read_guest(chain: Chain, offset: int, length: int) -> bytes:
    """Guest bytes [offset, offset+length), clamped to the virtual size, exactly as QEMU reads them."""
    end = min(offset + length, chain.size)
    if offset >= end:
        return b""
    out = bytearray(end - offset)
    p = resolve_chain(chain, offset, end)
    for i in range(len(p.start)):
        s, e, kind, depth = int(p.start[i]), int(p.end[i]), int(p.kind[i]), int(p.depth[i])
        if kind == T.NORMAL or kind == RAW_DATA:
            out[s - offset:e - offset] = chain.layers[depth].data_pread(int(p.host[i]), e - s)
        elif kind == T.COMPRESSED:
            data = read_compressed(chain, depth, int(p.host[i]), s)
            cs = chain.layers[depth].cluster_size
            base = s - s % cs
            out[s - offset:e - offset] = data[s - base:e - base]
        elif kind == T.INVALID:
            raise invalid_entry(chain, depth, s)
        # zero kinds, unallocated past the chain: already zeros
    return bytes(out)


CHECK_STEP = 1 << 30  # guest bytes resolved at a time by check_read


def check_read(chain: Chain, offset: int, length: int) -> None:
    """Fail as QEMU's read of [offset, offset+length) fails, without keeping its data: an invalid
    or misaligned L2 entry (or L2 table) in any layer the read reaches, a compressed cluster that
    does not decompress. A qemu-io `read` without -P is this."""
    end = min(offset + length, chain.size)
    pos = offset
    while pos < end:
        stop = min(end, pos + CHECK_STEP)
        p = resolve_chain(chain, pos, stop)
        bad = np.flatnonzero(p.kind == T.INVALID)
        if len(bad):
            raise invalid_entry(chain, int(p.depth[bad[0]]), int(p.start[bad[0]]))
        for i in np.flatnonzero(p.kind == T.COMPRESSED).tolist():
            read_compressed(chain, int(p.depth[i]), int(p.host[i]), int(p.start[i]))
        pos = stop


def read_compressed(chain: Chain, depth: int, word0: int, guest_offset: int) -> bytes:
    """The whole guest cluster a compressed L2 descriptor (word 0) holds."""
    img: Image = chain.layers[depth]  # type: ignore[assignment]
    host, nbytes = descriptor_fields(word0, img.cluster_bits)
    cluster = guest_offset >> img.cluster_bits
    where = f"{img.path}: compressed cluster at guest 0x{cluster << img.cluster_bits:x} (host 0x{host:x})"
    if host >= img.file_size:
        raise CorruptImage(f"{where} lies past the end of the file")
    # QEMU reads the descriptor's sectors; bytes past EOF read as zero.
    return decompress(img.pread(host, nbytes), img.cluster_size, img.header.compression_type, where)


def fails_at_request_start(chain: Chain, depth: int, guest_offset: int) -> bool:
    """True for an error QEMU meets only when a request starts in this cluster (a compressed
    entry or a host offset other than the guest's, in an image with an external data file:
    qcow2_get_host_offset); False for an invalid subcluster bitmap, which already fails the
    request whose scan reaches it (count_contiguous_subclusters)."""
    img: Image = chain.layers[depth]  # type: ignore[assignment]
    if not img.header.has_data_file:
        return False
    w0, bm, _l2_off, _l2_index = img.l2_entry(guest_offset >> img.cluster_bits)
    if w0 & C.QCOW_OFLAG_COMPRESSED:
        return True
    if not img.extended_l2:
        return True
    alloc, zero = bm & 0xFFFFFFFF, bm >> 32
    return not alloc & zero


def invalid_entry(chain: Chain, depth: int, guest_offset: int) -> InvalidEntry:
    """The error QEMU's read fails with on an invalid L2 entry, naming the table and index."""
    img: Image = chain.layers[depth]  # type: ignore[assignment]
    cluster = guest_offset >> img.cluster_bits
    w0, _bm, l2_off, l2_index = img.l2_entry(cluster)
    host = w0 & C.L2E_OFFSET_MASK
    compressed = bool(w0 & C.QCOW_OFLAG_COMPRESSED)
    allocated = host != 0 or (img.header.has_data_file and w0 & C.QCOW_OFLAG_COPIED)
    if not compressed and host % img.cluster_size:
        what = f"cluster allocation offset 0x{host:x} unaligned"
    elif img.header.has_data_file and compressed:
        what = "compressed cluster entry found in image with external data file"
    elif img.header.has_data_file and allocated and host != cluster << img.cluster_bits:
        what = (f"external data file host cluster offset 0x{host:x} does not match guest cluster offset "
                f"0x{cluster << img.cluster_bits:x}")
    else:
        what = "invalid cluster entry found"
    return InvalidEntry(
        f"{img.path}: {what} (L2 offset: 0x{l2_off:x}, L2 index: 0x{l2_index:x}) "
        f"at guest offset 0x{cluster << img.cluster_bits:x}",
        l2_off, l2_index, img.path)
