"""An interrupted step is rolled back only when the image is provably as the step left it; torn
journal records are never half-applied; `undo` after a crash takes back the crashed step alone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.file.journal import Journal, JournalError, _scan, journal_path, recover, undo
from tests.qemu import create, qemu_check, qemu_io

CS = 65536


def digest(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        data = f.read()
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.fixture
def image(tmp_path, qemu):
    path = str(tmp_path / "a.qcow2")
    create(path, "64M")
    qemu_io(path, "write -q -P 0x11 0 256k")
    return path


def crash_in_step(image: str, *, commit_first: bool = True) -> tuple:
    """A committed step, then a step cut short (the journal is left as a kill leaves it);
    returns the image's digest after the committed step and at the crash."""
    img = open_image(image, writable=True)
    j = Journal(img, durable=True)
    if commit_first:
        j.begin({"command": "first"})
        img.pwrite(CS * 5, b"\x21" * 5000)
        j.commit()
    committed = digest(image)
    j.begin({"command": "second"})
    img.pwrite(CS * 5 + 100, b"\x22" * 9000)       # in place
    img.pwrite(img.file_size + 512, b"\x23" * CS)  # growth
    img.punch_hole(CS * 6, 8192)
    crashed = digest(image)
    os.close(j.fd)  # "killed": no rollback, no commit
    img.close()
    return committed, crashed


def test_undo_after_a_crash_rolls_back_the_crashed_step_only(image):
    committed, _ = crash_in_step(image)
    res = undo(image)
    assert res.interrupted and res.undone == 0 and res.remaining == 1
    assert digest(image) == committed
    assert undo(image).undone == 1  # the committed step is the next one


def test_undo_all_after_a_crash_goes_back_to_the_start(image):
    orig = digest(image)
    crash_in_step(image)
    res = undo(image, steps=None)
    assert res.interrupted and res.undone == 1 and digest(image) == orig


@pytest.mark.parametrize("written", [1, 10, 47, 48, 49, 60, 150, 4000])
def test_a_torn_last_record_is_ignored_and_the_rest_rolled_back(image, monkeypatch, written):
    """The process dies while appending a record (only `written` bytes of it reach the file): the
    change it announced never started; recovery ignores it, rolls the rest of the step back."""
    img = open_image(image, writable=True)
    j = Journal(img, durable=True)
    j.begin({"command": "first"})
    img.pwrite(CS * 5, b"\x21" * 5000)
    j.commit()
    committed = digest(image)
    j.begin({"command": "second"})
    img.pwrite(CS * 5 + 100, b"\x22" * 9000)
    img.pwrite(img.file_size + 512, b"\x23" * CS)
    real = os.pwrite

    def dies(fd, data, offset):
        if fd == j.fd:
            real(fd, memoryview(data)[:written], offset)
            raise SystemExit("killed")  # nothing after this runs: no rollback, no image write
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", dies)
    with pytest.raises(SystemExit):
        img.pwrite(CS * 6, b"\x24" * 20000)
    monkeypatch.setattr(os, "pwrite", real)
    os.close(j.fd)
    img.close()
    res = undo(image)
    assert res.interrupted and res.undone == 0 and digest(image) == committed


def test_a_torn_record_in_the_middle_is_damage_not_a_crash(image):
    crash_in_step(image)
    jpath = journal_path(image)
    with open(jpath, "rb") as f:
        steps, end = _scan(f.fileno(), jpath)
    second = steps[-1]
    with open(jpath, "r+b") as f:  # spoil the payload of the first record after the step's STEP record
        f.seek(second.start)
        data = f.read()
    import struct

    plen = struct.unpack(">Q", data[32:40])[0]
    pos = second.start + 48 + plen + 48 + 3  # inside the next record's payload
    with open(jpath, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    before = digest(image)
    with pytest.raises(JournalError, match="damaged|no longer as that step left it"):
        undo(image)
    assert digest(image) == before


@pytest.mark.parametrize("foreign", ["in place", "appended", "same length, new bytes"])
def test_a_foreign_write_after_the_crash_is_never_rolled_over(image, foreign):
    committed, crashed = crash_in_step(image)
    with open(image, "r+b") as f:
        if foreign == "in place":  # over bytes the crashed step wrote
            f.seek(CS * 5 + 200)
            f.write(b"\x77" * 100)
        elif foreign == "appended":  # past the step's starting length: a rollback would cut it off
            f.seek(0, 2)
            f.write(b"\x78" * 4096)
        else:  # in a block the step touched, outside the bytes it wrote
            f.seek(CS * 5 + 100 + 9000 + 10)
            f.write(b"\x79" * 10)
    changed = digest(image)
    with pytest.raises(JournalError) as e:
        undo(image)
    msg = str(e.value)
    assert "qdebug undo --discard-journal" in msg and "not touched" in msg
    assert digest(image) == changed
    with open_image(image, writable=True) as img, pytest.raises(JournalError, match="discard-journal"):
        Journal(img)
    assert digest(image) == changed
    res = undo(image, discard=True)
    assert res.discarded == 2 and not os.path.exists(journal_path(image)) and digest(image) == changed


def test_an_image_modified_long_after_the_crash_is_refused_even_with_equal_bytes(image, monkeypatch):
    """Content alone cannot tell another program's identical bytes from the step's own: the
    image's mtime, later than the step's last record, refuses the rollback."""
    import qdebug.engine.file.journal as jmod

    crash_in_step(image)
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 * 10**9))  # touched 10 s later
    before = digest(image)
    with pytest.raises(JournalError, match="modified .* after the step's last journal record"):
        undo(image)
    assert digest(image) == before
    monkeypatch.setattr(jmod, "GRACE_NS", 60 * 10**9)
    assert undo(image).interrupted


def test_recover_is_a_no_op_without_an_unfinished_step(image):
    assert recover(image) is False
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        img.pwrite(CS * 5, b"x")
        j.commit()
    before = digest(image)
    assert recover(image) is False and digest(image) == before


KILLER = textwrap.dedent("""
    import os, sys
    from qdebug.engine.file.image import open_image
    from qdebug.engine.file.journal import Journal
    path, kill_at, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    img = open_image(path, writable=True)
    j = Journal(img, keep=keep)
    calls = [0]
    def killer(offset, length, data=None):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), 9)
    img.write_hooks.append(killer)
    for step in range(3):
        j.begin({"step": step})
        for i in range(4):
            img.pwrite(65536 * (5 + i) + 700 * step, bytes([0x30 + step]) * 30000)
        img.pwrite(img.file_size, bytes([0x40 + step]) * 70000)
        j.commit()
    os._exit(0)
""")


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("kill_at", [1, 2, 3, 5, 6, 8, 11, 15])
def test_sigkill_then_qemu_writes_then_recovery_never_loses_qemus_data(image, keep, kill_at, tmp_path):
    """A process killed mid-step, then QEMU writes the image (allowed: the locks died), then
    recovery: rolled back when that destroys nothing of QEMU's, else refused (and the journal
    discarded, as the refusal says). Either way QEMU's data are there and QEMU finds no corruption."""
    p = subprocess.run([sys.executable, "-c", KILLER, image, str(kill_at), "1" if keep else "0"])
    assert p.returncode == -9
    time.sleep(0.01)
    qemu_io(image, "write -q -P 0x77 0 128k", "write -q -P 0x78 8M 64k", "flush")
    try:
        recovered = recover(image)
    except JournalError as e:
        assert "discard-journal" in str(e)
        undo(image, discard=True)
        recovered = False
    code, counts = qemu_check(image)
    assert counts.get("corruptions", 0) == 0 and code in (0, 3)
    qemu_io(image, "read -q -P 0x77 0 128k", "read -q -P 0x78 8M 64k")
    assert recovered in (True, False)
