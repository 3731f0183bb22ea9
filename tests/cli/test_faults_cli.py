"""Smaller faults, each one line and a non-zero exit: runaway numbers, symbolic-link loops, undo
after a crash, a journal that refuses, discarded journals."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.file.journal import Journal, journal_path
from tests.qemu import create, qemu_io

QDEBUG = [sys.executable, "-m", "qdebug.cli"]
HUGE = "9" * 5000


def qdebug(*args, stdin: bytes | None = None):
    return subprocess.run([*QDEBUG, *args], capture_output=True, input=stdin)


def one_line(p) -> str:
    lines = [line for line in p.stderr.decode().splitlines() if not line.startswith(("usage:", " "))]
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert "internal error" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("line", [f"write -P 0x11 0 {HUGE}", f"write -P 0x11 {HUGE} 512", f"discard 0 {HUGE}",
                                  f"write -P {HUGE} 0 512", f"read -P 0x11 0 0x{'f' * 5000}"],
                         ids=["length", "offset", "discard", "pattern", "hex"])
def test_numbers_of_thousands_of_digits_are_refused_like_qemu_io(tmp_path, qemu, line):
    img = create(str(tmp_path / "a.qcow2"), "64M")
    (tmp_path / "t").write_text(line + "\n")
    msg = one_line(qdebug("replay", img, str(tmp_path / "t")))
    assert "t:1:" in msg and ("argument too large" in msg or "not a valid pattern byte" in msg) and len(msg) < 300
    qemu = subprocess.run(["qemu-io", "-f", "qcow2", "-c", line, img], capture_output=True)
    said = qemu.stdout + qemu.stderr
    assert b"too large" in said or b"not a valid pattern byte" in said  # qemu-io refuses them too


def test_plan_and_create_refuse_runaway_numbers(tmp_path, qemu):
    img = create(str(tmp_path / "a.qcow2"), "64M")
    for msg in (one_line(qdebug("plan", img, f"write 0 {HUGE}")),
                one_line(qdebug("create", str(tmp_path / "n.qcow2"), HUGE))):
        assert ("too large" in msg or "out of range" in msg) and len(msg) < 300, msg


def test_a_loop_of_symbolic_links_as_backing_file_is_named(tmp_path, qemu):
    os.symlink("l2", tmp_path / "l1")
    os.symlink("l1", tmp_path / "l2")
    img = str(tmp_path / "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "l1", "-F", "raw", img, "1M"], check=True)
    assert "is a loop of symbolic links" in one_line(qdebug("read", img, "0", "512"))
    assert "not found" not in one_line(qdebug("map", img))


def test_undo_after_a_crash_says_it_rolled_back_the_crashed_step_only(tmp_path, qemu):
    img = create(str(tmp_path / "a.qcow2"), "64M")
    qemu_io(img, "write -q -P 0x11 0 128k")
    image = open_image(img, writable=True)
    j = Journal(image)
    j.begin({"command": "one"})
    image.pwrite(5 * 65536, b"\x21" * 100)
    j.commit()
    j.begin({"command": "two"})
    image.pwrite(5 * 65536 + 50, b"\x22" * 100)
    os.close(j.fd)  # killed
    image.close()
    p = qdebug("undo", img)
    assert p.returncode == 0
    assert p.stdout.decode().strip() == (f"{img}: rolled back the step an interrupted run left unfinished; "
                                         "1 step(s) left in the journal")
    p = qdebug("undo", "--discard-journal", img)
    assert p.returncode == 0 and "undo journal removed (1 step(s)" in p.stdout.decode()
    assert not os.path.exists(journal_path(img))


def test_a_refused_recovery_is_one_line_naming_the_choices(tmp_path, qemu):
    img = create(str(tmp_path / "a.qcow2"), "64M")
    qemu_io(img, "write -q -P 0x11 0 128k")
    image = open_image(img, writable=True)
    j = Journal(image)
    j.begin({"command": "two"})
    image.pwrite(5 * 65536 + 50, b"\x22" * 100)
    os.close(j.fd)
    image.close()
    qemu_io(img, "write -q -P 0x77 0 128k")  # another program, over what the step wrote
    for args in (["undo", img], ["repair", img], ["replay", img, "-"], ["check", "-r", "leaks", img]):
        msg = one_line(qdebug(*args, stdin=b""))
        assert "qdebug undo --discard-journal" in msg and "not touched" in msg, args
    qemu_io(img, "read -q -P 0x77 0 128k")
