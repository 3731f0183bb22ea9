"""The script contract (tests/cli/test_scripts_contract.py) for the commands its READERS table does
not hold: the other readers (stats, repair --dry-run, layout's JSON, scan, whatif) and every
command that writes (replay, --journal, repair, check -r, undo, create over an image). Each as a
script meets it: a writer holding the image, a read-only file system, a pipe closed early, a
closed or full stdout; stdin is never a terminal here. qemu-img / qemu-io are the oracle for the
locks: `Failed to get "write" lock` for a writer, `Failed to get shared "write" lock` for a reader,
exit 1, and the held image untouched."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.cli.test_scripts_contract import (LOCK_MESSAGE, held, image, one_error_line, qd,  # noqa: F401
                                             read_only_image, sh)
from tests.qemu import qemu_img

OTHER_READERS = [
    (["stats", "{img}", "{trace}"], 1),
    (["stats", "--output=json", "{img}", "{trace}"], 1),
    (["repair", "--dry-run", "{img}"], 1),
    (["layout", "--output=json", "{img}"], 1),
]
WRITERS = [
    ["replay", "{img}", "{trace}"],
    ["replay", "--journal", "{img}", "{trace}"],
    ["repair", "{img}"],
    ["check", "-r", "all", "{img}"],
    ["create", "{img}", "64M"],
]


def _fill(argv, img, tmp_path) -> list[str]:
    trace = tmp_path / "t.trace"
    if not trace.exists():
        trace.write_text("write -P 7 0 4k\ndiscard 64k 64k\n")
    return [a.format(img=img, trace=trace, dir=os.path.dirname(img)) for a in argv]


def _ids(rows) -> list[str]:
    return [" ".join(r[0] if isinstance(r, tuple) else r) for r in rows]


@pytest.mark.parametrize("argv,status", OTHER_READERS, ids=_ids(OTHER_READERS))
def test_other_readers_are_refused_while_a_writer_holds_the_image(held, tmp_path, argv, status):
    before = open(held, "rb").read()
    r = qd(*_fill(argv, held, tmp_path))
    assert r.returncode == status, r.stderr
    assert LOCK_MESSAGE in one_error_line(r.stderr) and r.stdout == ""
    assert open(held, "rb").read() == before


@pytest.mark.parametrize("argv", [a for a, _ in OTHER_READERS], ids=_ids(OTHER_READERS))
def test_other_readers_with_force_share_read_anyway_and_say_so(held, tmp_path, argv):
    r = qd(*_fill(argv, held, tmp_path), "-U")
    assert r.returncode in (0, 2, 3), r.stderr  # (repair --dry-run: work to do)
    warnings = [ln for ln in r.stderr.splitlines() if "-U" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("qdebug: warning: ") and "transient" in warnings[0]


@pytest.mark.parametrize("argv", [["replay", "-U", "{img}", "{trace}"], ["repair", "-U", "{img}"],
                                  ["check", "-U", "-r", "all", "{img}"]], ids=["replay", "repair", "check -r"])
def test_force_share_is_refused_where_the_command_writes(image, tmp_path, argv):
    path = str(tmp_path / "w.qcow2")
    shutil.copy(image, path)
    before = open(path, "rb").read()
    r = qd(*_fill(argv, path, tmp_path))
    assert r.returncode == 1 and "-U" in one_error_line(r.stderr)
    assert open(path, "rb").read() == before
    q = qemu_img("check", "-U", "-r", "all", path, check=False)  # qemu-img: -U only where it reads
    assert q.returncode == 1 and b"force-share=on can only be used with read-only images" in q.stderr


@pytest.mark.parametrize("argv", WRITERS, ids=_ids(WRITERS))
def test_writers_are_refused_while_a_writer_holds_the_image_as_qemu_io_is(held, tmp_path, argv):
    before = open(held, "rb").read()
    r = qd(*_fill(argv, held, tmp_path))
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert 'Failed to get "write" lock' in line and held in line, line
    assert "-U" not in line  # (no reading anyway for a command that writes)
    assert open(held, "rb").read() == before and not os.path.exists(held + ".qdebug-journal")
    q = qemu_img("create", "-q", "-f", "qcow2", held, "64M", check=False)  # qemu-img's create: the same
    assert q.returncode == 1 and b'Failed to get "write" lock' in q.stderr


def test_undo_is_refused_while_a_writer_holds_the_image(image, tmp_path):
    from tests.cli.test_scripts_contract import _wait_for_writer
    import subprocess

    path = str(tmp_path / "u.qcow2")
    shutil.copy(image, path)
    assert qd("replay", "--journal", path, *_fill(["{trace}"], path, tmp_path)).returncode == 0
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_writer(path, proc)
        before = open(path, "rb").read()
        r = qd("undo", path)
        assert r.returncode == 1 and 'Failed to get "write" lock' in one_error_line(r.stderr)
        assert open(path, "rb").read() == before
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)
    assert qd("undo", path).returncode == 0  # and once QEMU is gone, it works


def test_scan_names_a_held_image_as_not_checked(held):
    r = qd("scan", os.path.dirname(held))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "not checked" in r.stdout and held.split("/")[-1] in r.stdout and LOCK_MESSAGE in r.stdout


@pytest.mark.parametrize("argv", [a for a, _ in OTHER_READERS], ids=_ids(OTHER_READERS))
def test_other_readers_work_on_a_read_only_filesystem(read_only_image, argv):
    d = os.path.dirname(read_only_image)
    r = qd(*[a.format(img=read_only_image, trace=os.path.join(d, "t.trace")) for a in argv])
    assert r.returncode in (0, 2, 3) and "error" not in r.stderr, r.stderr  # (repair --dry-run: work to do)


@pytest.mark.parametrize("argv", WRITERS + [["undo", "{img}"]], ids=_ids(WRITERS + [["undo", "{img}"]]))
def test_writers_on_a_read_only_filesystem_fail_in_one_line(read_only_image, argv):
    d = os.path.dirname(read_only_image)
    before = open(read_only_image, "rb").read()
    r = qd(*[a.format(img=read_only_image, trace=os.path.join(d, "t.trace")) for a in argv])
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert read_only_image in line or "k.qcow2" in line, line
    assert open(read_only_image, "rb").read() == before


STREAMED = [a for a, _ in OTHER_READERS] + [["whatif", "{trace}", "--size", "64M"], ["scan", "{dir}"]]


@pytest.mark.parametrize("argv", STREAMED, ids=_ids(STREAMED))
def test_other_readers_end_quietly_on_a_closed_pipe_and_fail_in_one_line_on_a_closed_or_full_stdout(
        image, tmp_path, argv):
    status = qd(*_fill(argv, image, tmp_path)).returncode
    cmd = " ".join(f"'{a}'" for a in _fill(argv, image, tmp_path))
    r = sh(f"qdebug {cmd} | head -c 1 >/dev/null; exit ${{PIPESTATUS[0]}}")
    assert r.returncode == status and "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr
    for redirect, words in ((">&-", "standard output is closed"), (">/dev/full", "No space left on device")):
        r = sh(f"qdebug {cmd} {redirect}")
        assert r.returncode == 1, (redirect, r.stderr)
        assert words in one_error_line(r.stderr), (redirect, r.stderr)
