"""`replay` for scripts: `-c COMMAND` (repeatable, as qemu-io -c), `--log -` (the log on standard
output), and a log that is complete under --keep-going (a line the parser refuses is a record with
its error). Guest data judged by qemu-io running the same commands."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.qemu import QEMU_IO, convert_raw, create

QDEBUG = [sys.executable, "-m", "qdebug.cli"]
CMDS = ["write -P 0x11 0 4k", "flush", "write -P 0x22 64k 8k", "read -P 0x22 64k 8k", "aio_flush"]


def test_c_commands_and_the_log_on_stdout(tmp_path, qemu):
    img, ref = create(str(tmp_path / "a.qcow2"), "4M"), create(str(tmp_path / "ref.qcow2"), "4M")
    p = subprocess.run([*QDEBUG, "replay", img, *(a for c in CMDS for a in ("-c", c)), "--log", "-"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    # (aio_flush waits for aio requests, which qdebug completes at once: nothing to record)
    assert [r["command"] for r in recs] == CMDS[:-1] and all(r["error"] is None for r in recs)
    assert [r["line"] for r in recs] == [1, 2, 3, 4]
    subprocess.run([QEMU_IO, "-f", "qcow2", *(a for c in CMDS for a in ("-c", c)), ref], check=True, capture_output=True)
    assert convert_raw(img, str(tmp_path / "a.raw")) == convert_raw(ref, str(tmp_path / "r.raw"))


def test_a_trace_and_c_commands_together_are_refused(tmp_path, qemu):
    img = create(str(tmp_path / "a.qcow2"), "4M")
    (tmp_path / "t").write_text("write 0 4k\n")
    p = subprocess.run([*QDEBUG, "replay", img, str(tmp_path / "t"), "-c", "flush"], capture_output=True, text=True)
    assert p.returncode == 1 and "not both" in p.stderr
    p = subprocess.run([*QDEBUG, "replay", img], capture_output=True, text=True)
    assert p.returncode == 1 and "no trace given" in p.stderr


def test_refused_lines_are_log_records_under_keep_going(tmp_path, qemu):
    img = create(str(tmp_path / "a.qcow2"), "4M")
    trace = tmp_path / "t.trace"
    trace.write_text("write -P 0x22 0 4k\nbogus 1 2\nwrite -P 0x23 8k 4k\n")
    log = tmp_path / "log.jsonl"
    p = subprocess.run([*QDEBUG, "replay", "--keep-going", "--log", str(log), img, str(trace)],
                       capture_output=True, text=True)
    assert p.returncode == 1
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3]
    assert recs[1]["index"] is None and recs[1]["command"] == "bogus 1 2" and "not found" in recs[1]["error"]
    assert recs[0]["error"] is None and recs[2]["error"] is None and recs[2]["index"] == 1


def test_create_over_an_image_removes_its_stale_journal(tmp_path, qemu):
    img = str(tmp_path / "j.qcow2")
    assert subprocess.run([*QDEBUG, "create", "-q", img, "4M"]).returncode == 0
    p = subprocess.run([*QDEBUG, "replay", "--journal", img, "-c", "write -P 0x11 0 4k"], capture_output=True)
    assert p.returncode == 0 and (tmp_path / "j.qcow2.qdebug-journal").exists()
    p = subprocess.run([*QDEBUG, "create", img, "4M"], capture_output=True, text=True)
    assert p.returncode == 0 and "removed" in p.stderr and "undo journal" in p.stderr
    assert not (tmp_path / "j.qcow2.qdebug-journal").exists()
    # -q drops the note (as qemu-img's -q drops everything but errors), not the removal
    subprocess.run([*QDEBUG, "replay", "--journal", img, "-c", "write -P 0x11 0 4k"], check=True)
    p = subprocess.run([*QDEBUG, "create", "-q", img, "4M"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "" and not (tmp_path / "j.qcow2.qdebug-journal").exists()
    p = subprocess.run([*QDEBUG, "replay", img, "-c", "write -P 0x22 0 4k"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
