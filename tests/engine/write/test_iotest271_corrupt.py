"""QEMU iotest 271's "Corrupted L2 entries" and "Detect and repair unaligned clusters" blocks,
command by command through qdebug and a live qemu-io on twin images: the same commands fail
(with or without -P: QEMU's reads check every L2 entry they meet), the image ends with the same
corrupt bit (a read-write open marks it, as qemu-io does) and byte-identical metadata."""

from __future__ import annotations

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.format import constants as C
from tests.engine.harness import assert_same_metadata, qdebug_process, qemu_process
from tests.qemu import create, qemu_io

pytestmark = pytest.mark.qemu
L2 = 0x40000  # the first L2 table of a fresh 1M image with 64 KiB clusters


def _poke(path: str, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _twins(tmp_path, setup: list[str], poke: tuple[int, bytes], backing: bool = False) -> tuple[str, str]:
    out = []
    for name in ("img", "ref"):
        d = tmp_path / name
        d.mkdir()
        if backing:
            (d / "base.raw").write_bytes(b"\xff" * (128 << 10))
        path = create(str(d / "t.qcow2"), "1M" if not backing else "128k",
                      backing="base.raw" if backing else None, backing_fmt="raw")
        qemu_io(path, *setup)
        _poke(path, *poke)
        out.append(path)
    return out[0], out[1]


def _corrupt_bit(path: str) -> bool:
    with open_image(path) as img:
        return bool(img.header.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT)


def _same(tmp_path, setup, poke, cmds, *, fails: list[bool], corrupt: bool, backing: bool = False) -> None:
    img, ref = _twins(tmp_path, setup, poke, backing)
    results = qdebug_process(img, cmds)
    text = qemu_process(ref, cmds)
    assert [r.error is not None for r in results] == fails, [r.error for r in results]
    assert text.count("failed") == sum(fails), text
    assert _corrupt_bit(img) == _corrupt_bit(ref) == corrupt
    assert_same_metadata(img, ref)


BE = lambda v, n: v.to_bytes(n, "big")  # noqa: E731


@pytest.mark.parametrize("op", ["read", "write"])
def test_271_zero_flag_on_allocated_entry_is_ignored(qemu, engine_mode, tmp_path, op):
    _same(tmp_path, ["write -q -P 0x11 0 2k"], (L2 + 7, b"\x01"), [f"{op} -q -P 0x11 0 1k"],
          fails=[False], corrupt=False)


@pytest.mark.parametrize("cmd", ["read 0 192k", "read -P 0 0 192k", "write 0 192k"])
def test_271_allocated_entry_with_both_bits(qemu, engine_mode, tmp_path, cmd):
    _same(tmp_path, ["write -q 32k 128k"], (L2 + 24, BE(1, 4)), [cmd, "read 0 1k"], fails=[True, True],
          corrupt=True)


@pytest.mark.parametrize("op", ["read", "write"])
def test_271_zero_flag_on_unallocated_entry_is_ignored(qemu, engine_mode, tmp_path, op):
    _same(tmp_path, ["write -q 256k 1k"], (L2 + 7, b"\x01"), [f"{op} -q 0 1k"], fails=[False], corrupt=False)


@pytest.mark.parametrize("cmd", ["read 0 1k", "read -P 0 0 1k", "write 0 1k", "read 0 64k"])
def test_271_unallocated_entry_with_alloc_bit(qemu, engine_mode, tmp_path, cmd):
    """The issue's case (b): a plain `read 0 1k` fails with EIO, and marks the image corrupt."""
    _same(tmp_path, ["write -q 256k 1k"], (L2 + 15, b"\x01"), [cmd], fails=[True], corrupt=True)


def test_271_read_next_to_an_invalid_entry_succeeds(qemu, engine_mode, tmp_path):
    _same(tmp_path, ["write -q 256k 1k"], (L2 + 15, b"\x01"), ["read 64k 1k", "read 60k 8k", "read 64k 1k"],
          fails=[False, True, True], corrupt=True)


@pytest.mark.parametrize("op", ["read", "write"])
def test_271_unallocated_entry_with_both_bits(qemu, engine_mode, tmp_path, op):
    _same(tmp_path, ["write -q 256k 1k"], (L2 + 24, BE((1 << 32) | 1, 8)), [f"{op} 0 192k"], fails=[True],
          corrupt=True)


@pytest.mark.parametrize("op", ["read", "write"])
def test_271_compressed_cluster_with_bitmap_is_not_corrupt(qemu, engine_mode, tmp_path, op):
    _same(tmp_path, ["write -q -P 11 -c 0 64k"], (L2 + 11, b"\x01\x80"), [f"{op} -P 11 0 64k"], fails=[False],
          corrupt=False)


@pytest.mark.parametrize("cmd", ["read -q 0 2k", "read -q 32k 2k", "read -P 0xff 0 2k"])
def test_271_unaligned_cluster_offset_fails_reads(qemu, engine_mode, tmp_path, cmd):
    """An allocated cluster at an unaligned offset: every read that meets it fails, also of its
    unallocated subclusters (QEMU checks the offset before the subcluster type)."""
    _same(tmp_path, ["write -q -P 1 4k 2k"], (L2 + 6, b"\x02"), [cmd], fails=[True], corrupt=True, backing=True)


def test_read_over_an_invalid_entry_of_a_backing_file_fails_without_marking(qemu, tmp_path):
    """A backing file is opened read-only: QEMU fails the read but marks nothing, and the next
    command still works (no "No medium found")."""
    base = create(str(tmp_path / "base.qcow2"), "1M")
    qemu_io(base, "write -q 256k 1k")
    _poke(base, L2 + 15, b"\x01")
    tops = [create(str(tmp_path / f"{n}.qcow2"), "1M", backing=base, backing_fmt="qcow2") for n in ("a", "b")]
    cmds = ["read 0 1k", "read 64k 1k"]
    results = qdebug_process(tops[0], cmds)
    text = qemu_process(tops[1], cmds)
    assert [r.error is not None for r in results] == [True, False]
    assert text.count("failed") == 1
    assert not _corrupt_bit(tops[0]) and not _corrupt_bit(tops[1]) and not _corrupt_bit(base)
