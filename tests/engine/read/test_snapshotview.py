"""An internal snapshot opened as a read-only image reads what QEMU reads after `qemu-img snapshot
-a` (applied to a copy), including a snapshot taken at another virtual size."""

from __future__ import annotations

import shutil

import pytest

from qdebug.engine.errors import QcowError
from qdebug.engine.file.chain import Chain, open_chain
from qdebug.engine.read.guest import read_guest
from qdebug.engine.read.snapshotview import open_snapshot
from tests.qemu import create, qemu_img, qemu_io, qemu_map


@pytest.fixture
def snapped(tmp_path, qemu):
    path = create(str(tmp_path / "s.qcow2"), "1M")
    qemu_io(path, "write -P 0x11 0 256k", "write -P 0x12 8k 2k")
    qemu_img("snapshot", "-c", "first", path)
    qemu_io(path, "write -P 0x22 64k 64k", "discard 128k 64k", "write -P 0x23 512k 4k")
    qemu_img("snapshot", "-c", "second", path)
    qemu_img("resize", path, "2M")
    qemu_io(path, "write -P 0x33 1536k 64k")
    return path


@pytest.mark.parametrize("name", ["first", "second", "1", "2"])
def test_a_snapshot_reads_what_qemu_reads_after_applying_it(snapped, tmp_path, name):
    reverted = str(tmp_path / "reverted.qcow2")
    shutil.copy(snapped, reverted)
    qemu_img("snapshot", "-a", name, reverted)
    img = open_snapshot(snapped, name)
    try:
        with open_chain(reverted) as ref:
            assert img.size == ref.size == 1 << 20  # both snapshots were taken at 1 MiB
            snap = Chain([img])
            assert read_guest(snap, 0, img.size) == read_guest(ref, 0, ref.size)
        # the snapshot's L2 entries point where QEMU maps the reverted copy's data
        for e in qemu_map(reverted):
            if e["data"] and "offset" in e:
                w0, _, _, _ = img.l2_entry(e["start"] // img.cluster_size)
                assert w0 & 0x00FFFFFFFFFFFE00 == e["offset"] - e["start"] % img.cluster_size
    finally:
        img.close()


def test_the_active_image_is_unchanged_and_unknown_names_are_errors(snapped):
    with open_chain(snapped) as active:
        assert active.size == 2 << 20
        before = read_guest(active, 0, active.size)
    img = open_snapshot(snapped, "first")
    try:
        assert img.snapshot.name == "first" and not img.writable
        assert read_guest(Chain([img]), 64 << 10, 4096) == b"\x11" * 4096  # before the 0x22 write
    finally:
        img.close()
    with open_chain(snapped) as active:
        assert read_guest(active, 0, active.size) == before
    with pytest.raises(QcowError, match="no snapshot with ID or name 'third'"):
        open_snapshot(snapped, "third")
