"""On a full tmpfs, no command dies by a signal (reading a hole through a mapping used to need a
page: SIGBUS, exit 135); read-only commands work, writing ones (salvage and bundle too) fail in one
line and leave the image as it was, and no output or temporary file behind. A real tmpfs is mounted (root; CI runs as root), filled to the last page."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.qemu import QEMU_IMG, QEMU_IO, qemu_check

QDEBUG = [sys.executable, "-m", "qdebug.cli"]


@pytest.fixture
def full_tmpfs(tmp_path, tmpfs):
    """A 16 MiB tmpfs with sparse images on it (one with a raw backing file), then filled."""
    d = tmpfs("16m")
    img, base, top = f"{d}/a.qcow2", f"{d}/base.raw", f"{d}/top.qcow2"
    for path, extra in ((img, []), (top, ["-b", "base.raw", "-F", "raw"])):
        if extra:
            with open(base, "wb") as f:
                f.truncate(8 << 20)
                f.seek(1 << 20)
                f.write(b"\xee" * 4096)
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", *extra, path, "8M"],
                       check=True, cwd=d)
        subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -q -P 0x11 0 4k", "-c", "write -q -P 0x22 1M 4k",
                        "-c", "write -q -c -P 0x33 2M 64k", path], check=True, capture_output=True)
    shutil.copyfile(img, f"{tmp_path}/a-before.qcow2")
    with open(f"{d}/fill", "wb") as f:  # every free page taken
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError:
            pass
    yield d


def run(*args, cwd=None):
    return subprocess.run([*QDEBUG, *args], capture_output=True, cwd=cwd)


def assert_no_signal(p):
    assert p.returncode >= 0 and p.returncode not in (135, 134, 139), (p.returncode, p.stderr)


@pytest.mark.parametrize("args", [["info", "{d}/a.qcow2"], ["map", "--wide", "{d}/a.qcow2"], ["map", "--subclusters", "{d}/a.qcow2"],
                                  ["check", "{d}/a.qcow2"], ["read", "{d}/a.qcow2", "1M", "4k"],
                                  ["read", "{d}/a.qcow2", "3M", "64k"], ["read", "{d}/top.qcow2", "1M", "8k"],
                                  ["map", "--wide", "{d}/top.qcow2"], ["repair", "--dry-run", "{d}/a.qcow2"]])
def test_read_only_commands_work_on_a_full_tmpfs(full_tmpfs, args):
    p = run(*(a.format(d=full_tmpfs) for a in args))
    assert_no_signal(p)
    assert p.returncode == 0, p.stderr
    if args[0] == "read":
        want = {"1M": b"\x22" * 4096 if "a.qcow2" in args[1] else b"\x22" * 4096 + bytes(4096),
                "3M": bytes(65536)}[args[2]]
        assert p.stdout == want


def test_read_through_a_sparse_raw_backing_file(full_tmpfs):
    p = run("read", f"{full_tmpfs}/top.qcow2", "0", "2M")
    assert_no_signal(p)
    assert p.returncode == 0
    data = p.stdout
    assert data[:4096] == b"\x11" * 4096 and data[1 << 20:(1 << 20) + 4096] == b"\x22" * 4096
    assert data[4096:1 << 20] == bytes((1 << 20) - 4096)


def test_writing_commands_fail_in_one_line_and_change_nothing(full_tmpfs, tmp_path):
    d = full_tmpfs
    img = f"{d}/a.qcow2"
    with open(img, "rb") as f:
        before = f.read()
    trace = tmp_path / "t.trace"
    trace.write_text("".join(f"write -P 0x44 {i * 65536 + 4096} 60k\n" for i in range(40)))
    files = sorted(os.listdir(d))
    for args in (["replay", "--journal", img, str(trace)], ["replay", img, str(trace)],
                 ["create", f"{d}/new.qcow2", "64M"], ["salvage", img, "-o", f"{d}/s.raw"],
                 ["salvage", img, "-O", "qcow2", "-o", f"{d}/s.qcow2"], ["bundle", img, "-o", f"{d}/b.qcow2"]):
        p = run(*args)
        assert_no_signal(p)
        assert p.returncode != 0
        err = p.stderr.decode().strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0] and "internal error" not in err[0], err
        with open(img, "rb") as f:
            assert f.read() == before, args
        assert sorted(os.listdir(d)) == files, args  # no output, no temporary left behind
    assert not os.path.exists(img + ".qdebug-journal")
    assert qemu_check(img)[0] == 0
    q = subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", f"{d}/q.qcow2", "64M"], capture_output=True)
    assert q.returncode == 1 and sorted(os.listdir(d)) == files  # qemu-img's create leaves nothing either


def test_repair_and_undo_on_a_full_tmpfs(full_tmpfs, tmp_path):
    """A repair on a full tmpfs: done where it needs no new page, else refused in one line with the
    image as it was; the undo of a done repair works on the full file system too."""
    d = full_tmpfs
    img = f"{d}/a.qcow2"
    with open(img, "r+b") as f:  # a leak: the L1 table's cluster counted twice
        f.seek(2 * 65536 + 6)
        f.write(b"\x00\x02")
    with open(img, "rb") as f:
        before = f.read()
    p = run("repair", img)
    assert_no_signal(p)
    if p.returncode == 0:
        assert qemu_check(img)[0] == 0
        u = run("undo", img)
        assert_no_signal(u)
        assert u.returncode == 0, u.stderr
    else:
        err = p.stderr.decode().strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0], err
    with open(img, "rb") as f:
        assert f.read() == before
