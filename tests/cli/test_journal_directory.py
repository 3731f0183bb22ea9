"""A directory where the undo journal cannot be created (immutable, read-only): only what needs
the journal fails, saying so in one line; the image is untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.qemu import IN_CI, QEMU_IO, convert_raw, create, qemu_check

QDEBUG = [sys.executable, "-m", "qdebug.cli"]


@pytest.fixture
def immutable_dir(tmp_path, qemu):
    """A directory holding a leaky image, made immutable (chattr +i: files in it stay writable,
    no file can be created in it)."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        if IN_CI:
            pytest.fail("CI runs as root with chattr: this test must run")
        pytest.skip("chattr +i needs root and e2fsprogs")
    d = tmp_path / "locked"
    d.mkdir()
    img = create(str(d / "a.qcow2"), "64M")
    with open(img, "r+b") as f:  # a leak to repair
        f.seek(2 * 65536 + 6)
        f.write(b"\x00\x02")
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        yield img
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=False)


def test_repair_needs_the_journal_and_says_so(immutable_dir):
    with open(immutable_dir, "rb") as f:
        before = f.read()
    p = subprocess.run([*QDEBUG, "repair", immutable_dir], capture_output=True)
    err = [line for line in p.stderr.decode().splitlines() if line]
    assert p.returncode == 1 and len(err) == 1, err
    assert "cannot open the undo journal" in err[0] and "nothing was repaired" in err[0]
    with open(immutable_dir, "rb") as f:
        assert f.read() == before


def test_read_only_commands_and_dry_runs_need_no_journal(immutable_dir):
    for args in (["check", immutable_dir], ["repair", "--dry-run", immutable_dir], ["info", immutable_dir]):
        p = subprocess.run([*QDEBUG, *args], capture_output=True)
        assert p.returncode in (0, 3), (args, p.stderr)
    assert qemu_check(immutable_dir)[0] == 3  # (the leak is still there: nothing wrote)


def test_a_replay_without_journal_needs_none(immutable_dir, tmp_path):
    """Only crash safety needs the journal of a write-back replay: without it the replay runs,
    says so, and the image is what qemu-io makes of the trace; --journal fails, saying why."""
    trace = tmp_path / "t.trace"
    trace.write_text("".join(f"write -P 0x{i + 1:02x} {i * 300}k 100k\n" for i in range(40)) + "flush\n")
    with open(immutable_dir, "rb") as f:
        before = f.read()
    p = subprocess.run([*QDEBUG, "replay", "--journal", immutable_dir, str(trace)], capture_output=True, text=True)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "cannot open the undo journal" in err[0], err
    assert "without --journal" in err[0]
    with open(immutable_dir, "rb") as f:
        assert f.read() == before
    p = subprocess.run([*QDEBUG, "replay", immutable_dir, str(trace)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "replaying without it" in p.stderr and "internal error" not in p.stderr
    ref = str(tmp_path / "ref.qcow2")
    with open(ref, "wb") as f:
        f.write(before)
    subprocess.run([QEMU_IO, "-f", "qcow2", ref], input=trace.read_bytes(), capture_output=True, check=True)
    assert convert_raw(immutable_dir, str(tmp_path / "got.raw")) == convert_raw(ref, str(tmp_path / "want.raw"))
    assert qemu_check(immutable_dir)[1].get("corruptions", 0) == 0
    assert not os.path.exists(immutable_dir + ".qdebug-journal")

