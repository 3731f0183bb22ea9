"""A replay that fills the disk: each write the disk refuses fails the command the way qemu-io fails
it (`TRACE:LINE: ...: write failed: No space left on device`, exit 1; `--keep-going` goes on, as
qemu-io does), and the image afterwards is clean and holds every command the step log calls done.

A real tmpfs is mounted (root; CI runs as root). QEMU is the judge: `qemu-img check` on the image,
and its guest data equal to what qemu-io makes, on a roomy disk, of exactly the lines the log calls
done. qemu-io runs the same trace on the same full disk too: it fails writes there as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.qemu import QEMU_IO, convert_raw, create, qemu_check

QDEBUG = [sys.executable, "-m", "qdebug.cli"]
ENOSPC = "write failed: No space left on device"


@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs("6m")


def trace_lines() -> list[str]:
    """New clusters until the disk is full (unaligned: COW from the backing file), a flush now and
    then, then rewrites of clusters written first (in place: they need no new space)."""
    out = []
    for i in range(140):
        out.append(f"write -P 0x{i % 200 + 1:02x} {i * 65536 + 4096} 60k")
        if i % 40 == 39:
            out.append("flush")
    out += [f"write -P 0xee {i * 65536 + 8192} 4k" for i in range(12)]
    return out


def setup_images(d: str, backing: bool) -> str:
    if backing:
        create(f"{d}/base.qcow2", "16M", extended_l2=False)
        subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -q -P 0x5a 0 1M", "-c", "write -q -P 0x5b 8M 1M", f"{d}/base.qcow2"], check=True,
                       capture_output=True)
        create(f"{d}/a.qcow2", "16M", backing="base.qcow2")
    else:
        create(f"{d}/a.qcow2", "16M")
    return f"{d}/a.qcow2"


def replay(tmp_path, d: str, backing: bool, *options: str):
    """`qdebug replay` of trace_lines() on a new image on `d`: (lines, trace, image, log, process)."""
    lines = trace_lines()
    trace = tmp_path / "t.trace"
    trace.write_text("".join(line + "\n" for line in lines))
    img = setup_images(d, backing)
    log = str(tmp_path / "log.jsonl")
    p = subprocess.run([*QDEBUG, "replay", "--log", log, *options, img, str(trace)], capture_output=True, text=True)
    return lines, trace, img, log, p


def done_lines(log: str) -> list[int]:
    with open(log) as f:
        recs = [json.loads(line) for line in f]
    return [r["line"] for r in recs if r["error"] is None]


def expected_guest(tmp_path, lines: list[str], done: list[int], backing: bool) -> bytes:
    """What qemu-io makes of exactly the lines the log calls done, on a roomy disk."""
    d = tmp_path / "ref"
    d.mkdir()
    img = setup_images(str(d), backing)
    script = "".join(lines[n - 1] + "\n" for n in done)
    p = subprocess.run([QEMU_IO, "-f", "qcow2", img], input=script.encode(), capture_output=True)
    assert p.returncode == 0 and b"failed" not in p.stdout, p.stdout[-500:]
    return convert_raw(img, str(tmp_path / "ref.raw"))


@pytest.mark.parametrize("journal", [False, True], ids=["write-back", "journal"])
@pytest.mark.parametrize("backing", [False, True], ids=["no-backing", "backing"])
def test_a_full_disk_fails_commands_like_qemu_io(small_tmpfs, tmp_path, journal, backing):
    d = small_tmpfs
    lines, trace, img, log, p = replay(tmp_path, d, backing, "--keep-going", *(["--journal"] if journal else []))
    assert p.returncode == 1, p.stderr
    errors = p.stderr.strip().splitlines()
    assert errors[-1].endswith("command(s) failed") and "internal error" not in p.stderr
    failed = errors[:-1]
    assert failed and all(e.startswith(f"qdebug: error: {trace}:") and e.endswith(ENOSPC) for e in failed), errors
    done = done_lines(log)
    assert len(done) + len(failed) == len(lines)
    if not journal:  # rewrites in place succeed on the full disk, as in qemu-io (with --journal each
        # needs room for its before-image in the undo journal)
        assert all(n in done for n in range(len(lines) - 11, len(lines) + 1))
    rc, report = qemu_check(img)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report
    assert not os.path.exists(img + ".qdebug-journal") or journal
    assert convert_raw(img, str(tmp_path / "got.raw")) == expected_guest(tmp_path, lines, done, backing)

    # qemu-io on the same full disk: it fails writes too, and keeps going
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    img = setup_images(d, backing)
    q = subprocess.run([QEMU_IO, "-f", "qcow2", "-t", "writeback", img], input=trace.read_bytes(), capture_output=True)
    q_failed = q.stdout.decode().count(ENOSPC)
    assert q.returncode == 1 and q_failed, q.stdout[-300:]
    assert qemu_check(img)[0] == 0
    # the same writes fail, give or take what qdebug's undo journal takes of the disk
    assert abs(q_failed - len(failed)) <= len(lines) // 5, (q_failed, len(failed))


def test_without_keep_going_the_first_failure_ends_the_replay(small_tmpfs, tmp_path):
    d = small_tmpfs
    lines, trace, img, log, p = replay(tmp_path, d, False)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(ENOSPC), err
    done = done_lines(log)
    assert done == list(range(1, done[-1] + 1))
    assert qemu_check(img)[0] == 0
    assert convert_raw(img, str(tmp_path / "got.raw")) == expected_guest(tmp_path, lines, done, False)
