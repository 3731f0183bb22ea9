"""Compressed cluster codecs: raw deflate with window bits 12 (zlib type) and zstd.

QEMU decompresses until exactly one cluster is produced and ignores trailing bytes (the
descriptor's sector count may cover more than the compressed stream); anything else is an error.
"""

from __future__ import annotations

import zlib

import zstandard

from ..errors import CorruptImage
from . import constants as C


def descriptor_fields(word0: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, bytes to read) of a compressed L2 descriptor (qcow2.txt "Compressed Clusters")."""
    x = 62 - (cluster_bits - 8)
    offset = word0 & ((1 << x) - 1)
    nb_sectors = ((word0 >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, nb_sectors * 512 - (offset % 512)


def make_descriptor(host_offset: int, csize: int, cluster_bits: int) -> int:
    x = 62 - (cluster_bits - 8)
    extra = (host_offset + csize - 1) // 512 - host_offset // 512
    return C.QCOW_OFLAG_COMPRESSED | (extra << x) | host_offset


def decompress(data: bytes, cluster_size: int, compression_type: int, where: str) -> bytes:
    """One cluster from `data`; CorruptImage naming `where` if the stream is bad or short."""
    try:
        if compression_type == C.QCOW2_COMPRESSION_TYPE_ZLIB:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, cluster_size)
        else:
            out = _zstd_cluster(data, cluster_size, where)
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImage(f"{where}: compressed data cannot be decompressed ({e})") from None
    if len(out) < cluster_size:
        raise CorruptImage(f"{where}: compressed data decompresses to {len(out)} bytes, not one cluster ({cluster_size})")
    return out[:cluster_size]


def compress(data: bytes, compression_type: int) -> bytes:
    """Compress one cluster the way QEMU does (raw deflate level default, window 12; zstd frame with its content size, as QEMU 7.2 writes it)."""
    if compression_type == C.QCOW2_COMPRESSION_TYPE_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    return zstandard.ZstdCompressor(level=0, write_content_size=True).compress(data)


_ZSTD_FEED = 1024  # input bytes per step: a 4-byte RLE block yields <= 128 KiB, so <= 32 MiB per step


def _zstd_cluster(data: bytes, cluster_size: int, where: str) -> bytes:
    """QEMU's qcow2_zstd_decompress: frames until exactly one cluster is out, and the last frame
    must end there (more output -> EIO); the input is fed in small steps so a few KiB of zstd
    claiming gigabytes never inflates beyond a cluster plus one block."""
    out = bytearray()
    pos = 0
    d = zstandard.ZstdDecompressor().decompressobj()
    while True:
        if len(out) > cluster_size:
            raise CorruptImage(f"{where}: compressed data decompresses to more than one cluster ({cluster_size})")
        if d.eof:
            if len(out) == cluster_size:
                break
            pos -= len(d.unused_data)  # the next frame starts there
            d = zstandard.ZstdDecompressor().decompressobj()
        if pos >= len(data):
            break
        chunk = data[pos:pos + _ZSTD_FEED]
        out += d.decompress(chunk)
        pos += len(chunk)
    if len(out) == cluster_size and not d.eof:
        raise CorruptImage(f"{where}: compressed data does not end at the cluster boundary (more than one cluster)")
    return bytes(out)
