"""Every write path checked: short writes continued, ENOSPC / EIO / EROFS raised as a StorageError
that keeps errno, and the image never left half-changed (the step is rolled back, or, if even the
rollback is refused, the journal is kept for `qdebug undo`). Faults are injected by wrapping
os.pwrite / os.pwritev / os.ftruncate / os.fsync for one file descriptor."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from qdebug.engine.errors import QcowError, StorageError
from qdebug.engine.file.fileio import pwrite_all
from qdebug.engine.file.image import open_image
from qdebug.engine.file.journal import Journal, journal_path, journal_steps, undo
from tests.qemu import create, qemu_check, qemu_io

CS = 65536


def digest(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        data = f.read()
    return len(data), hashlib.sha256(data).hexdigest()


class Faults:
    """os.pwrite / pwritev / ftruncate / fsync of chosen files: short writes, or errors after N calls."""

    def __init__(self, monkeypatch):
        self.short: set[int] = set()
        self.fail: dict[int, tuple] = {}  # fd -> (errno, calls left before failing[, failures then])
        real_pwrite, real_pwritev, real_trunc = os.pwrite, os.pwritev, os.ftruncate
        real_fsync, real_fdatasync = os.fsync, os.fdatasync
        self.calls = 0

        def check(fd):
            if fd in self.fail:
                err, left, *times = self.fail[fd]
                if left <= 0:
                    if times and times[0] <= 1:
                        del self.fail[fd]
                    elif times:
                        self.fail[fd] = (err, 0, times[0] - 1)
                    raise OSError(err, os.strerror(err))
                self.fail[fd] = (err, left - 1, *times)

        def pwrite(fd, data, offset):
            self.calls += 1
            check(fd)
            if fd in self.short and len(data) > 1:
                return real_pwrite(fd, memoryview(data)[:len(data) // 2 or 1], offset)
            return real_pwrite(fd, data, offset)

        def pwritev(fd, bufs, offset):
            check(fd)
            if fd in self.short:
                return pwrite(fd, bytes(bufs[0]), offset)
            return real_pwritev(fd, bufs, offset)

        def ftruncate(fd, size):
            check(fd)
            return real_trunc(fd, size)

        def fsync(fd):
            check(fd)
            return real_fsync(fd)

        def fdatasync(fd):
            check(fd)
            return real_fdatasync(fd)

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


@pytest.fixture
def image(tmp_path, qemu):
    path = str(tmp_path / "a.qcow2")
    create(path, "64M")
    qemu_io(path, "write -q -P 0x11 0 256k", "write -q -P 0x22 1M 64k")
    return path


def test_short_writes_are_continued_until_every_byte_is_written(tmp_path, faults):
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    faults.short.add(fd)
    data = bytes(range(256)) * 300
    pwrite_all(fd, data, 10, path)
    pwrite_all(fd, [memoryview(data)[:1000], data[1000:]], 100000, path)
    os.close(fd)
    with open(path, "rb") as f:
        got = f.read()
    assert got[10:10 + len(data)] == data and got[100000:] == data
    assert faults.calls > 10  # each write really came in pieces


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT])
def test_os_errors_keep_errno_and_say_what_they_are(tmp_path, faults, err):
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    faults.fail[fd] = (err, 0)
    with pytest.raises(StorageError) as e:
        pwrite_all(fd, b"x" * 100, 4096, path)
    os.close(fd)
    assert e.value.errno == err and os.strerror(err) in str(e.value) and "0x1000" in str(e.value)
    assert "internal" not in str(e.value)


@pytest.mark.parametrize("where", ["image", "journal"])
@pytest.mark.parametrize("fail_after", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize("durable", [False, True])
def test_a_failing_write_fails_the_step_and_leaves_the_image_as_before(image, faults, where, fail_after, durable):
    """Whichever write of a step fails (the journal's records or the image's own), the step is
    rolled back: the image is byte for byte what it was, and QEMU finds it clean."""
    before = digest(image)
    img = open_image(image, writable=True)
    j = Journal(img, durable=durable)
    faults.fail[img.fd if where == "image" else j.fd] = (errno.ENOSPC, fail_after)
    j.begin({"n": 1})
    try:
        img.pwrite(CS * 5 + 100, b"\x33" * 70000)   # in place, over data
        img.pwrite(img.file_size + CS, b"\x44" * CS)  # growth
        img.punch_hole(CS * 5, 4096)
        img.truncate(img.file_size + 3 * CS)
        img.pwrite(CS * 6, b"\x55" * 10)
        j.commit()
        failed = False
    except StorageError as e:
        assert e.errno == errno.ENOSPC
        failed = True
        faults.fail.clear()
        j.abort()
    j.close()
    img.close()
    if failed:
        assert digest(image) == before
        assert not os.path.exists(journal_path(image))
    assert qemu_check(image)[0] == 0


def test_a_rollback_the_disk_refuses_keeps_the_journal_for_undo(image, faults):
    before = digest(image)
    img = open_image(image, writable=True)
    j = Journal(img)
    j.begin({"n": 1})
    img.pwrite(CS * 5, b"\x33" * 8192)
    faults.fail[img.fd] = (errno.EIO, 0)  # the device fails: the write, then the rollback too
    with pytest.raises(StorageError):
        img.pwrite(CS * 6, b"\x44" * 8192)
    with pytest.raises(QcowError, match="journal .* is kept: `qdebug undo"):
        j.abort()
    faults.fail.clear()
    j.close()
    img.close()
    assert os.path.exists(journal_path(image)) and not journal_steps(image)[-1].committed
    res = undo(image)  # the device is back: the interrupted step is rolled back, nothing else
    assert res.interrupted and res.undone == 0
    assert digest(image) == before


def test_undo_on_a_failing_disk_says_so_and_keeps_the_journal(image, faults):
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        img.pwrite(CS * 5, b"\x33" * 8192)
        j.commit()
    after = digest(image)
    real = os.open  # fail the image writes of the undo (its own fd, opened inside)

    def opener(path, flags, *a):
        fd = real(path, flags, *a)
        if path == image:
            faults.fail[fd] = (errno.EROFS, 0)
        return fd

    import qdebug.engine.file.journal as jmod
    old = jmod.os.open
    jmod.os.open = opener
    try:
        with pytest.raises(StorageError, match="Read-only file system"):
            undo(image)
    finally:
        jmod.os.open = old
    faults.fail.clear()
    assert digest(image) == after and len(journal_steps(image)) == 1
    undo(image)


def test_create_on_a_full_disk_fails_in_one_line(tmp_path, faults, monkeypatch):
    from qdebug.engine.write import create as cmod

    real = os.open

    def opener(path, flags, *a):
        fd = real(path, flags, *a)
        faults.short.add(fd)
        faults.fail[fd] = (errno.ENOSPC, 1)
        return fd

    monkeypatch.setattr(cmod.os, "open", opener)
    with pytest.raises(StorageError, match="No space left on device"):
        cmod.create_image(str(tmp_path / "n.qcow2"), 64 << 20)


def test_repair_on_a_failing_disk_changes_nothing(image, faults, qemu):
    from qdebug.engine.check.checker import check_image
    from qdebug.engine.check.repair import apply_repair, plan_repair
    from qdebug.engine.file.chain import open_chain

    with open(image, "r+b") as f:  # a leak: the L1 table's cluster (3) counted twice
        f.seek(2 * CS + 2 * 3)
        f.write(b"\x00\x02")
    before = digest(image)
    with open_chain(image, writable=True) as chain:
        plan = plan_repair(chain, check_image(chain.top))
        assert plan.items
        faults.fail[chain.top.fd] = (errno.ENOSPC, 1, 1)  # the second write fails (the rollback works)
        with pytest.raises(StorageError, match="No space left"):
            apply_repair(chain, plan)
    assert digest(image) == before and not os.path.exists(journal_path(image))
