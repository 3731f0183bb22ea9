"""Hostile compressed clusters: descriptors past EOF, streams that decompress to less or more than
a cluster, decompression bombs (zlib and zstd). Output is bounded to one cluster; errors name the
compressed cluster; where QEMU reads the cluster, qdebug returns the same bytes."""

from __future__ import annotations

import struct
import zlib

import zstandard

from tests.hostile.conftest import error_line, qd
from tests.hostile.images import layout_of, patch
from tests.qemu import qemu_img


def _point(img: str, entry_off: int, host: int, nbytes: int, cluster_bits: int) -> None:
    x = 62 - (cluster_bits - 8)
    sectors = min((host + nbytes - 1) // 512 - host // 512, (1 << (cluster_bits - 8)) - 1)
    patch(img, entry_off, struct.pack(">Q", 1 << 62 | sectors << x | host))


def _qemu_read(img: str, tmp_path) -> bytes | None:
    out = tmp_path / "qemu.raw"
    p = qemu_img("convert", "-f", "qcow2", "-O", "raw", img, str(out), check=False)
    return out.read_bytes() if p.returncode == 0 else None


def _qdebug_read(img: str, tmp_path, offset: int, length: int) -> tuple[dict, bytes]:
    out = tmp_path / "qd.raw"
    res = qd("read", img, str(offset), str(length), "-o", out)
    return res, out.read_bytes() if res["rc"] == 0 else b""


def test_descriptor_past_eof(img64, tmp_path):
    lay = layout_of(img64)
    _point(img64, lay.compressed_entries[0], lay.file_size + (1 << 20), 512, lay.cluster_bits)
    res, _ = _qdebug_read(img64, tmp_path, 384 << 10, 64 << 10)
    line = error_line(res)
    assert "compressed cluster" in line and "past the end" in line and "0x60000" in line, line
    assert _qemu_read(img64, tmp_path) is None
    assert qd("map", "--output=json", img64)["rc"] == 0  # mapping needs no decompression


def _bomb_zlib(n: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return b"".join(c.compress(bytes(1 << 20)) for _ in range(n >> 20)) + c.flush()


def _bomb_zstd(n: int) -> bytes:
    c = zstandard.ZstdCompressor(level=1).compressobj()
    return b"".join(c.compress(bytes(1 << 24)) for _ in range(n >> 24)) + c.flush()


def test_zlib_bomb_reads_one_cluster_like_qemu(img64, tmp_path):
    """QEMU inflates into a one-cluster buffer and accepts a full buffer: so do we, in bounded memory."""
    lay = layout_of(img64)
    bomb = _bomb_zlib(256 << 20)  # 256 MiB of zeros in ~256 KiB... capped by the descriptor's size field
    at = lay.file_size + 512 - lay.file_size % 512
    patch(img64, at, bomb)
    _point(img64, lay.compressed_entries[0], at, len(bomb), lay.cluster_bits)
    res, got = _qdebug_read(img64, tmp_path, 0, 4 << 20)
    theirs = _qemu_read(img64, tmp_path)
    assert (theirs is None) == (res["rc"] != 0)
    if theirs is not None:
        assert got == theirs
    assert res["secs"] < 5


def test_zstd_bomb_is_bounded(zstd16, tmp_path):
    lay = layout_of(zstd16)
    bomb = _bomb_zstd(4 << 30)  # 4 GiB of zeros in ~128 KiB: must never be inflated whole
    at = lay.file_size + 512 - lay.file_size % 512
    patch(zstd16, at, bomb[: 64 << 10])  # what the descriptor can cover with 16 KiB clusters
    _point(zstd16, lay.compressed_entries[0], at, 64 << 10, lay.cluster_bits)
    res, got = _qdebug_read(zstd16, tmp_path, 0, 1 << 20)
    assert res["secs"] < 5
    theirs = _qemu_read(zstd16, tmp_path)
    if theirs is not None and res["rc"] == 0:
        assert got == theirs
    else:
        assert res["rc"] == 1


def test_stream_shorter_than_a_cluster(img64, tmp_path):
    lay = layout_of(img64)
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    short = c.compress(b"\x5a" * 1000) + c.flush()
    host = lay.compressed_data[0][0]
    patch(img64, host, short)
    _point(img64, lay.compressed_entries[0], host, len(short), lay.cluster_bits)
    res, _ = _qdebug_read(img64, tmp_path, 384 << 10, 64 << 10)
    line = error_line(res)
    assert "decompresses to 1000 bytes" in line and "0x60000" in line
    assert _qemu_read(img64, tmp_path) is None


def test_garbage_stream(zstd16, tmp_path):
    lay = layout_of(zstd16)
    host = lay.compressed_data[0][0]
    patch(zstd16, host, b"\x28\xb5\x2f\xfd" + b"\xff" * 60)
    res, _ = _qdebug_read(zstd16, tmp_path, 0, 16 << 10)
    assert "cannot be decompressed" in error_line(res)
    assert _qemu_read(zstd16, tmp_path) is None


def test_zstd_frame_longer_than_a_cluster_fails_like_qemu(zstd16, tmp_path):
    """QEMU's zstd reader demands that the frame end exactly at the cluster boundary."""
    lay = layout_of(zstd16)
    host = lay.compressed_data[0][0]
    long = zstandard.ZstdCompressor().compress(b"\x33" * (32 << 10))
    patch(zstd16, host, long)
    _point(zstd16, lay.compressed_entries[0], host, len(long), lay.cluster_bits)
    res, _ = _qdebug_read(zstd16, tmp_path, 0, 16 << 10)
    assert "more than one cluster" in error_line(res)
    assert _qemu_read(zstd16, tmp_path) is None


def test_zstd_two_frames_make_one_cluster_like_qemu(zstd16, tmp_path):
    lay = layout_of(zstd16)
    host = lay.compressed_data[0][0]
    c = zstandard.ZstdCompressor()
    two = c.compress(b"\x44" * (8 << 10)) + c.compress(b"\x55" * (8 << 10)) + b"trailing junk"
    patch(zstd16, host, two)
    _point(zstd16, lay.compressed_entries[0], host, len(two), lay.cluster_bits)
    res, got = _qdebug_read(zstd16, tmp_path, 0, 1 << 20)
    theirs = _qemu_read(zstd16, tmp_path)
    assert theirs is not None and res["rc"] == 0 and got == theirs
    assert got[:16 << 10] == b"\x44" * (8 << 10) + b"\x55" * (8 << 10)
