"""QEMU-compatible image locks, checked against a real qemu-io in both directions."""

from __future__ import annotations

import os
import struct
import subprocess
import time

import pytest

from qdebug.engine.errors import QcowError
from qdebug.engine.file.chain import open_chain
from qdebug.engine.file.image import open_image
from qdebug.engine.file.locking import ImageInUse, ImageLock, check_chain_writable, check_writable, lock_chain
from tests.qemu import QEMU_IMG, QEMU_IO, create


def locked_bytes(path: str) -> set[int]:
    """Bytes of `path` with OFD locks, from /proc/locks (what QEMU's own locks look like)."""
    ino = os.stat(path).st_ino
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "OFDLCK" in parts and parts[5].rsplit(":", 1)[-1] == str(ino):
                out.update(range(int(parts[6]), int(parts[7]) + 1))
    return out


class QemuIoHolder:
    """A qemu-io process with the image open, kept alive by an open stdin pipe."""

    def __init__(self, path: str, *args: str):
        self.p = subprocess.Popen([QEMU_IO, *args, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        want = {100} if "-r" in args or "-U" in args else {100, 101}
        while not want <= locked_bytes(path):
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"qemu-io did not take its locks: {self.p.stderr.read().decode()}")
            time.sleep(0.02)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(10)


@pytest.fixture
def image(tmp_path, qemu):
    return create(str(tmp_path / "a.qcow2"), "64M")


def test_qdebug_writer_takes_exactly_qemus_writer_bytes(image):
    holder = QemuIoHolder(image)
    qemu_bytes = locked_bytes(image)
    holder.close()
    assert qemu_bytes == {100, 101, 103, 201, 203}
    with open_image(image, writable=True) as img, ImageLock(img):
        assert locked_bytes(image) == qemu_bytes
    assert locked_bytes(image) == set()


def test_qdebug_reader_takes_qemu_io_r_bytes(image):
    holder = QemuIoHolder(image, "-r")
    qemu_bytes = locked_bytes(image)
    holder.close()
    with open_image(image) as img, ImageLock(img, write=False):
        assert locked_bytes(image) == qemu_bytes == {100, 201, 203}


@pytest.mark.parametrize("write,message", [(True, 'Failed to get "write" lock'),
                                           (False, 'Failed to get shared "write" lock')])
def test_qdebug_refuses_while_qemu_io_writes(image, write, message):
    holder = QemuIoHolder(image)
    try:
        with open_image(image, writable=write) as img:
            with pytest.raises(ImageInUse) as e:
                ImageLock(img, write=write).acquire()
            assert str(e.value) == f"Could not open '{image}': {message}: Is another process using the image [{image}]?"
            assert holder.p.poll() is None
    finally:
        holder.close()
    # the refusal released everything it took: qemu-io can use the image again
    assert locked_bytes(image) == set()
    with open_image(image, writable=True) as img, ImageLock(img):
        pass


def test_qdebug_writer_refuses_a_qemu_reader_but_reader_shares(image):
    holder = QemuIoHolder(image, "-r")
    try:
        with open_image(image, writable=True) as img:
            with pytest.raises(ImageInUse, match='Failed to get "write" lock'):
                ImageLock(img).acquire()
        with open_image(image) as img, ImageLock(img, write=False):
            pass  # two readers coexist, as two `qemu-io -r` do
    finally:
        holder.close()


def test_force_share_reader_does_not_block_qdebug(image):
    holder = QemuIoHolder(image, "-U", "-r")
    try:
        with open_image(image, writable=True) as img, ImageLock(img):
            pass
    finally:
        holder.close()


@pytest.mark.parametrize("argv,message", [
    (["info"], 'Failed to get shared "write" lock'),
    (["check"], 'Failed to get shared "write" lock'),
])
def test_qemu_img_refuses_while_qdebug_writes(image, argv, message):
    with open_image(image, writable=True) as img, ImageLock(img):
        p = subprocess.run([QEMU_IMG, *argv, image], capture_output=True, text=True)
        assert p.returncode != 0
        assert message in p.stderr
        # -U (force share) still reads, exactly as with a running QEMU
        assert subprocess.run([QEMU_IMG, "info", "-U", image], capture_output=True).returncode == 0
    assert subprocess.run([QEMU_IMG, "info", image], capture_output=True).returncode == 0


def test_qemu_io_refuses_while_qdebug_writes(image):
    with open_image(image, writable=True) as img, ImageLock(img):
        p = subprocess.run([QEMU_IO, "-c", "write 0 4k", image], capture_output=True, text=True)
        assert p.returncode != 0 and 'Failed to get "write" lock' in p.stderr
        p = subprocess.run([QEMU_IO, "-r", "-c", "read 0 4k", image], capture_output=True, text=True)
        assert p.returncode != 0 and 'Failed to get shared "write" lock' in p.stderr


def test_qemu_io_writer_refuses_while_qdebug_reads(image):
    with open_image(image) as img, ImageLock(img, write=False):
        p = subprocess.run([QEMU_IO, "-c", "write 0 4k", image], capture_output=True, text=True)
        assert p.returncode != 0 and 'Failed to get "write" lock' in p.stderr


def test_locks_vanish_with_the_descriptor(image):
    img = open_image(image, writable=True)
    ImageLock(img).acquire()
    img.close()
    assert locked_bytes(image) == set()


def test_second_qdebug_writer_is_refused(image):
    with open_image(image, writable=True) as a, ImageLock(a):
        with open_image(image, writable=True) as b:
            with pytest.raises(ImageInUse, match='Failed to get "write" lock'):
                ImageLock(b).acquire()


def set_incompatible_bits(path: str, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        (old,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", old | bits))


def test_corrupt_bit_is_refused_with_how_to_repair(image):
    set_incompatible_bits(image, 2)
    with open_image(image, writable=True) as img:
        with pytest.raises(QcowError, match=r"corrupt bit is set.*qdebug repair.*qemu-img check -r all"):
            check_writable(img)
    # and QEMU agrees that it cannot be written as it is
    p = subprocess.run([QEMU_IO, "-c", "write 0 4k", image], capture_output=True, text=True)
    assert "corrupt" in (p.stdout + p.stderr).lower()


def test_dirty_bit_is_refused(tmp_path, qemu):
    image = create(str(tmp_path / "d.qcow2"), "64M", lazy_refcounts="on")
    set_incompatible_bits(image, 1)
    with open_image(image, writable=True) as img:
        with pytest.raises(QcowError, match="dirty bit"):
            check_writable(img)


def test_backing_files_are_read_only_and_locked_as_qemu_locks_them(tmp_path, qemu):
    base = create(str(tmp_path / "base.qcow2"), "64M")
    top = create(str(tmp_path / "top.qcow2"), "64M", backing=base)
    with open(base, "rb") as f:
        base_bytes = f.read()
    with open_chain(top, writable=True) as chain:
        check_chain_writable(chain)
        assert chain.top.writable and not chain.layers[1].writable
        with pytest.raises(QcowError, match="read-only"):
            chain.layers[1].pwrite(0, b"x")
        locks = lock_chain(chain)
        try:
            assert locked_bytes(base) == {100, 201, 203}  # what QEMU holds on a writer's backing file
            p = subprocess.run([QEMU_IO, "-c", "write 0 4k", base], capture_output=True, text=True)
            assert 'Failed to get "write" lock' in p.stderr
        finally:
            for lk in locks:
                lk.release()
    with open(base, "rb") as f:
        assert f.read() == base_bytes


def test_nested_locks_on_one_descriptor_keep_the_outer_one(image):
    """A repair inside a session locks the same fd again; its release must not unlock the session."""
    with open_image(image, writable=True) as img:
        outer = ImageLock(img).acquire()
        with ImageLock(img):
            pass
        assert locked_bytes(image) == {100, 101, 103, 201, 203}
        p = subprocess.run([QEMU_IO, "-c", "read 0 4k", image], capture_output=True, text=True)
        assert 'Failed to get "write" lock' in p.stderr
        outer.release()
        assert locked_bytes(image) == set()
