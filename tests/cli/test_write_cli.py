"""`qdebug create | plan | replay | undo` end to end, with qemu-img / qemu-io as the oracle."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

from qdebug.cli import main
from qdebug.engine.file.journal import journal_path
from tests.engine.file.test_locking import QemuIoHolder, locked_bytes
from tests.qemu import QEMU_IO, create, qemu_check, qemu_img, qemu_io
from tests.trace.random_traces import random_trace, strip_comments

CS = 65536
SIZE = 4 << 20


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def qdebug(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdebug.cli", *args], capture_output=True, input=stdin)


def qdebug_while_qemu_holds(image: str, *args: str, qemu_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run qdebug while a qemu-io process has `image` open."""
    holder = QemuIoHolder(image, *qemu_args)
    try:
        return qdebug(*args)
    finally:
        holder.close()


def write_trace(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def qemu_io_stdin(image: str, lines: list[str]) -> subprocess.CompletedProcess:
    """qemu-io reading the trace from stdin, as the issue feeds it (comments removed)."""
    return subprocess.run([QEMU_IO, "-f", "qcow2", image], input="\n".join(strip_comments(lines)).encode() + b"\n",
                          capture_output=True)


def metadata_clusters(path: str) -> list[tuple[int, bytes]]:
    """(refcount, bytes) of every host cluster, with the bytes of plain data clusters left out.

    Data clusters are compared through the guest (`qemu-img compare`): their bytes in subclusters the
    bitmap marks unallocated are invisible, and QEMU leaves zeros there where it punched a hole when
    the cluster was last freed. Everything else (header, tables, L2 entries with their host offsets
    and bitmaps, refcounts, compressed data) must be identical byte for byte.
    """
    import numpy as np

    from qdebug.engine.file.image import open_image
    from qdebug.engine.format import constants as C

    with open_image(path) as img:
        cs = img.cluster_size
        data: set[int] = set()
        for l1e in img.l1.tolist():
            l2_off = l1e & C.L1E_OFFSET_MASK
            if l2_off:
                w0 = np.asarray(img.l2_table(l2_off)[0], dtype=np.uint64)
                plain = (w0 & np.uint64(C.QCOW_OFLAG_COMPRESSED)) == 0
                data.update((((w0[plain] & np.uint64(C.L2E_OFFSET_MASK)) >> np.uint64(img.cluster_bits))
                             .astype(np.int64)).tolist())
        data.discard(0)
        return [(rc, img.pread(i * cs, cs) if rc and i not in data else b"")
                for i in range(-(-img.file_size // cs)) for rc in [img.refcount(i)]]


def same_images(a: str, b: str) -> None:
    """Same guest data, same metadata (QEMU picks the same host offsets in one process)."""
    assert qemu_img("compare", "-q", a, b, check=False).returncode == 0, "guest data differs"
    la, lb = metadata_clusters(a), metadata_clusters(b)
    diff = [i for i in range(max(len(la), len(lb)))
            if (la[i] if i < len(la) else (0, b"")) != (lb[i] if i < len(lb) else (0, b""))]
    assert not diff, f"host clusters differ (refcount or metadata bytes): {diff[:10]}"


# ---- create ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [
    "", "cluster_size=16k", "cluster_size=2M,refcount_bits=64", "extended_l2=off,refcount_bits=1",
    "compression_type=zstd,cluster_size=128k",
])
def test_create_is_byte_identical_to_qemu_img(tmp_path, qemu, opts):
    mine, ref = str(tmp_path / "mine.qcow2"), str(tmp_path / "ref.qcow2")
    args = ["create", mine, "1G"] + (["-o", opts] if opts else [])
    assert main(args) == 0
    qemu_opts = "extended_l2=on," + opts if "extended_l2" not in opts else opts
    qemu_img("create", "-q", "-f", "qcow2", "-o", qemu_opts.rstrip(","), ref, "1G")
    assert digest(mine) == digest(ref)


def test_create_with_backing_takes_its_size_and_qemu_reads_through(tmp_path, qemu, monkeypatch):
    base = create(str(tmp_path / "base.qcow2"), "3M")
    qemu_io(base, "write -P 0x7 1M 64k")
    top = str(tmp_path / "top.qcow2")
    assert main(["create", top, "-b", "base.qcow2", "-F", "qcow2", "-q"]) == 0
    ref = str(tmp_path / "ref.qcow2")
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2", ref)
    assert digest(top) == digest(ref)
    assert qemu_io(top, "read -P 0x7 1M 64k").returncode == 0


@pytest.mark.parametrize("args,message", [
    (["-o", "cluster_size=3k"], "Cluster size must be a power of two"),
    (["-o", "bogus=1"], "Invalid parameter 'bogus'"),
    (["-o", "extended_l2=maybe"], "Parameter 'extended_l2' expects 'on' or 'off'"),
    (["-F", "qcow2"], "Backing format cannot be used without backing file"),
])
def test_create_errors_are_one_line(tmp_path, args, message):
    p = qdebug("create", str(tmp_path / "x.qcow2"), "1G", *args)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert err.startswith("qdebug: error:") and message in err and err.count("\n") == 1


def test_create_refuses_an_image_qemu_holds(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), "64M")
    before = digest(image)
    p = qdebug_while_qemu_holds(image, "create", image, "1G")
    assert p.returncode == 1 and b"Is another process using the image" in p.stderr
    assert digest(image) == before


# ---- plan --------------------------------------------------------------------------------------------
def test_plan_leaves_the_image_untouched(tmp_path, qemu, capsys):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    qemu_io(image, "write -P 0x11 0 64k")
    before = digest(image)
    assert main(["plan", image, "write -P 0x22 8k 4k", "--output=json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert isinstance(plan, dict) and plan
    assert main(["plan", image, "write -P 0x22 8k 4k"]) == 0
    assert capsys.readouterr().out.strip()
    assert digest(image) == before


def test_plan_refuses_while_qemu_writes_and_rejects_bad_commands(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    p = qdebug_while_qemu_holds(image, "plan", image, "write 0 4k")
    assert p.returncode == 1 and b'Failed to get shared "write" lock' in p.stderr
    p = qdebug("plan", image, "write -Q 0 4k")
    assert p.returncode == 1 and p.stderr.decode().startswith("qdebug: error: plan: ")


# ---- replay: differential against qemu-io ----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backing", [None, "qcow2", "raw"])
def test_replay_matches_qemu_io(tmp_path, qemu, seed, backing):
    lines = random_trace(seed, 60, SIZE, comments=True)
    trace = write_trace(tmp_path / "t.trace", lines)
    base = None
    if backing == "qcow2":
        base = create(str(tmp_path / "base.qcow2"), SIZE)
        qemu_io(base, "write -P 0x5a 0 4M", "write -z 1M 512k")
    elif backing == "raw":
        base = str(tmp_path / "base.raw")
        with open(base, "wb") as f:
            f.write(bytes([0x33]) * (SIZE - 12345))
    mine = create(str(tmp_path / "mine.qcow2"), SIZE, backing=base, backing_fmt=backing)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE, backing=base, backing_fmt=backing)
    q = qemu_io_stdin(ref, lines)
    qemu_failed = q.stdout.count(b"failed") + q.stderr.count(b"failed")
    p = qdebug("replay", "--keep-going", mine, trace)
    assert p.returncode == (1 if qemu_failed else 0), p.stderr.decode()
    assert p.stderr.decode().count("qdebug: error:") == qemu_failed
    same_images(mine, ref)
    assert qemu_check(mine)[0] == qemu_check(ref)[0]


def test_replay_writes_metadata_back_in_bounded_windows(tmp_path, qemu, monkeypatch):
    """Held-back metadata is flushed whenever it passes the limit (memory stays bounded on long
    traces), and at `flush` lines; the image is the same as qemu-io's either way."""
    import qdebug.trace.replay as replay_module
    from qdebug.engine.write.writer import WriteEngine

    flushes = []
    real_flush = WriteEngine.flush
    monkeypatch.setattr(replay_module, "WRITEBACK_LIMIT", 4096)
    monkeypatch.setattr(WriteEngine, "flush", lambda self: (flushes.append(self.dirty_bytes), real_flush(self)))
    lines = strip_comments(random_trace(11, 150, SIZE, mix=(("write", 50), ("zero", 20), ("discard", 10),
                                                            ("multi", 20))))
    lines.insert(40, "flush")
    trace = write_trace(tmp_path / "t.trace", lines)
    base = create(str(tmp_path / "base.qcow2"), SIZE)
    qemu_io(base, "write -P 0x5a 0 4M")
    mine = create(str(tmp_path / "mine.qcow2"), SIZE, backing=base, backing_fmt="qcow2")
    ref = create(str(tmp_path / "ref.qcow2"), SIZE, backing=base, backing_fmt="qcow2")
    assert main(["replay", mine, trace]) == 0
    qemu_io_stdin(ref, lines)
    assert len(flushes) > 20 and max(flushes) <= 4096 + 64 * 4096  # one command past the limit at most
    same_images(mine, ref)
    assert qemu_check(mine)[0] == 0
    assert not os.path.exists(journal_path(mine))


def test_replay_bounds_the_journal_of_a_window_of_in_place_rewrites(tmp_path, qemu, monkeypatch):
    """Rewriting allocated clusters holds no metadata back, but every first overwrite of a byte in a
    window is journaled (crash rollback): the window also ends when its journal passes a bound."""
    import qdebug.trace.replay as replay_module
    from qdebug.engine.file.journal import Journal

    sizes = []
    real_commit = Journal.commit
    monkeypatch.setattr(replay_module, "WINDOW_JOURNAL_LIMIT", 256 << 10)
    monkeypatch.setattr(Journal, "commit", lambda self: (sizes.append(self.step_bytes), real_commit(self)))
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    qemu_io(image, "write -P 1 0 2M")
    qemu_io(ref, "write -P 1 0 2M")
    lines = [f"write -q -P {i % 200 + 2} {(i * 40960) % (2 << 20)} 40k" for i in range(120)]
    trace = write_trace(tmp_path / "t.trace", lines)
    assert main(["replay", image, trace]) == 0
    qemu_io_stdin(ref, lines)
    assert len(sizes) > 5 and max(sizes) <= (256 << 10) + (64 << 10)
    same_images(image, ref)


def test_replay_from_stdin_with_log(tmp_path, qemu):
    lines = ["# a comment", "", "write -P 0x22 8k 4k", "discard 0 64k   # trailing", "write -z 64k 4k", "flush",
             "read -P 0 64k 4k"]
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    qemu_io_stdin(ref, lines)
    log = str(tmp_path / "steps.jsonl")
    p = qdebug("replay", image, "-", "--log", log, stdin=("\n".join(lines) + "\n").encode())
    assert p.returncode == 0, p.stderr
    same_images(image, ref)
    with open(log) as f:
        steps = [json.loads(line) for line in f]
    assert [s["line"] for s in steps] == [3, 4, 5, 6, 7]
    assert steps[0]["command"] == "write -P 0x22 8k 4k"
    w = steps[0]
    assert w["host-writes"] and w["clusters"][0]["before"] != w["clusters"][0]["after"] and "requests" not in w
    assert w["hazards"] == [] and w["error"] is None


@pytest.mark.parametrize("bad,reason", [
    ("read -P 0x99 0 4k", "Pattern verification failed"),
    ("readv -P 0x99 0 1k 3k", "Pattern verification failed"),
])
def test_replay_stops_at_a_failed_check_with_the_image_as_of_the_line_before(tmp_path, qemu, bad, reason):
    """(A line qemu-io rejects refuses the whole trace up front: tests/cli/test_replay_syntax.py.)"""
    lines = ["write -P 0x11 0 64k", "write -P 0x22 100k 8k", bad, "write -P 0x33 1M 64k"]
    trace = write_trace(tmp_path / "t.trace", lines)
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    qemu_io(ref, *lines[:2])
    p = qdebug("replay", image, trace)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert err.startswith(f"qdebug: error: {trace}:3: ") and reason in err and err.count("\n") == 1
    same_images(image, ref)
    # --keep-going goes on past the bad line, like qemu-io, and still fails at the end
    image2 = create(str(tmp_path / "b.qcow2"), SIZE)
    qemu_io(ref, lines[3])
    p = qdebug("replay", "--keep-going", image2, trace)
    assert p.returncode == 1 and f"{trace}:3:" in p.stderr.decode()
    same_images(image2, ref)


def test_a_command_qemu_fails_stops_the_replay_with_its_line(tmp_path, qemu):
    lines = ["write -P 0x11 0 64k", "write -c -P 0x22 0 64k", "write -P 0x33 1M 4k"]
    trace = write_trace(tmp_path / "t.trace", lines)
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    q = qemu_io_stdin(ref, lines[:2])
    assert b"Input/output error" in q.stdout + q.stderr  # QEMU itself refuses (EIO, nothing changed)
    p = qdebug("replay", image, trace)
    assert p.returncode == 1
    assert f"{trace}:2: write -c -P 0x22 0 64k: " in p.stderr.decode()
    same_images(image, ref)


def test_hazard_is_reproduced_and_flagged(tmp_path, qemu):
    lines = ["write -c -P 0x67 0 64k", "write -P 0x35 1k 3k", "write -P 0x3c 1M 512", "write -c -P 0x8a 2M 64k"]
    trace = write_trace(tmp_path / "t.trace", lines)
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    qemu_io_stdin(ref, lines)
    log = str(tmp_path / "log.jsonl")
    p = qdebug("replay", image, trace, "--log", log)
    assert p.returncode == 0
    err = p.stderr.decode()
    m = re.search(rf"{re.escape(trace)}:4: .*hazard.*guest \[0x([0-9a-f]+), 0x([0-9a-f]+)\)", err)
    assert m, err
    # the guest range named is inside what `write -P 0x3c 1M 512` wrote, which QEMU just overwrote
    assert 1 << 20 <= int(m.group(1), 16) < int(m.group(2), 16) <= (1 << 20) + 512
    same_images(image, ref)
    assert qemu_check(image)[0] == qemu_check(ref)[0] != 0  # QEMU's own corruption, reproduced
    with open(log) as f:
        steps = [json.loads(line) for line in f]
    assert [bool(s["hazards"]) for s in steps] == [False, False, False, True]


# ---- replay: safety ------------------------------------------------------------------------------------
def test_replay_refuses_while_qemu_holds_the_image(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    trace = write_trace(tmp_path / "t.trace", ["write 0 4k"])
    before = digest(image)
    p = qdebug_while_qemu_holds(image, "replay", image, trace)
    assert p.returncode == 1
    assert p.stderr.decode() == (f"qdebug: error: Could not open '{image}': Failed to get \"write\" lock: "
                                 f"Is another process using the image [{image}]?\n")  # qemu-img's words, one line
    assert digest(image) == before


def test_qemu_refuses_while_replay_runs(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "qdebug.cli", "replay", image, "-"], stdin=r,
                            stderr=subprocess.PIPE)
    os.close(r)
    try:
        os.write(w, b"write -P 0x1 0 4k\n")
        deadline = time.monotonic() + 30
        while locked_bytes(image) != {100, 101, 103, 201, 203}:  # until qdebug holds the image
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        p = subprocess.run([QEMU_IO, "-c", "read 0 4k", image], capture_output=True)
        assert b'Failed to get "write" lock' in p.stderr
        p = subprocess.run([QEMU_IO, "-r", "-c", "read 0 4k", image], capture_output=True)
        assert b'Failed to get shared "write" lock' in p.stderr
    finally:
        os.close(w)
        proc.wait(30)
    assert proc.returncode == 0
    assert qemu_io(image, "read -P 0x1 0 4k").returncode == 0  # the locks are gone with qdebug


def test_replay_refuses_a_corrupt_image(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    with open(image, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    before = digest(image)
    p = qdebug("replay", image, write_trace(tmp_path / "t.trace", ["write 0 4k"]))
    assert p.returncode == 1 and b"corrupt bit" in p.stderr and b"qemu-img check -r all" in p.stderr
    assert digest(image) == before


def test_replay_never_writes_the_backing_file(tmp_path, qemu):
    base = create(str(tmp_path / "base.qcow2"), SIZE)
    qemu_io(base, "write -P 0x44 0 4M")
    before = digest(base)
    top = create(str(tmp_path / "top.qcow2"), SIZE, backing=base)
    trace = write_trace(tmp_path / "t.trace", random_trace(9, 80, SIZE))
    assert qdebug("replay", "--keep-going", top, trace).returncode in (0, 1)
    assert digest(base) == before


def test_dry_run_writes_nothing_and_logs_plans(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    qemu_io(image, "write -P 0x11 0 1M")
    before = digest(image)
    log = str(tmp_path / "plans.jsonl")
    trace = write_trace(tmp_path / "t.trace", ["write -P 0x22 8k 4k", "discard 0 64k", "read 0 4k"])
    p = qdebug("replay", "--dry-run", image, trace, "--log", log, "--log-plans")
    assert p.returncode == 0, p.stderr
    assert digest(image) == before and not os.path.exists(journal_path(image))
    with open(log) as f:
        steps = [json.loads(line) for line in f]
    assert [s["line"] for s in steps] == [1, 2, 3]
    assert steps[0]["requests"] and steps[1]["requests"] and not steps[2]["requests"]


# ---- journal and undo ------------------------------------------------------------------------------------
def test_replay_journal_then_undo_steps_and_all(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    lines = strip_comments(random_trace(21, 30, SIZE, mix=(("write", 50), ("zero", 20), ("discard", 15),
                                                            ("multi", 15))))
    states = [digest(image)]
    for i in range(0, 30, 10):  # three replays of 10 lines: states after each
        assert qdebug("replay", "--journal", image, write_trace(tmp_path / f"t{i}", lines[i:i + 10])).returncode == 0
        states.append(digest(image))
    p = qdebug("undo", image, "--steps", "10")
    assert p.returncode == 0 and b"undid 10 step(s); 20 step(s) left" in p.stdout
    assert digest(image) == states[2]
    assert main(["undo", image, "--all"]) == 0
    assert digest(image) == states[0]
    assert not os.path.exists(journal_path(image))
    p = qdebug("undo", image)
    assert p.returncode == 1 and b"no undo journal" in p.stderr


def test_replay_without_journal_keeps_an_existing_journal_going(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    original = digest(image)
    assert qdebug("replay", "--journal", image, write_trace(tmp_path / "a", ["write -P 1 0 64k"])).returncode == 0
    p = qdebug("replay", image, write_trace(tmp_path / "b", ["write -P 2 64k 64k"]))
    assert p.returncode == 0 and b"journaling this replay too" in p.stderr
    assert qdebug("undo", image, "--all").returncode == 0
    assert digest(image) == original


def test_killed_replay_is_rolled_back_by_undo_all(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), 64 << 20)
    original = digest(image)
    trace = write_trace(tmp_path / "t.trace", random_trace(4, 20000, 64 << 20, mix=(("write", 60), ("multi", 40))))
    proc = subprocess.Popen([sys.executable, "-m", "qdebug.cli", "replay", "--journal", image, trace],
                            stderr=subprocess.PIPE)
    jpath = journal_path(image)
    deadline = time.monotonic() + 60
    while not (os.path.exists(jpath) and os.path.getsize(jpath) > 64 << 10):  # some steps are done
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # somewhere in the middle of a step, most likely
    assert proc.wait() == -signal.SIGKILL, "the replay finished before it could be killed"
    p = qdebug("undo", image, "--all", "--output", "json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["remaining"] == 0 and res["undone"] > 0
    assert digest(image) == original


def test_undo_refuses_while_qemu_holds_the_image(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    assert qdebug("replay", "--journal", image, write_trace(tmp_path / "a", ["write 0 64k"])).returncode == 0
    after = digest(image)
    p = qdebug_while_qemu_holds(image, "undo", image, qemu_args=("-r",))
    assert p.returncode == 1 and b"Is another process using the image" in p.stderr
    assert digest(image) == after


KILL_AT_NTH_WRITE = """
import os, sys
from qdebug.engine.file.image import Image
from qdebug.cli import main
n = int(sys.argv[1])
real = Image.pwrite
count = [0]
def pwrite(self, offset, data):
    count[0] += 1
    if count[0] == n:
        os._exit(9)  # the journal hook already ran: the crash is between its record and the write
    return real(self, offset, data)
Image.pwrite = pwrite
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("nth", [77, 123, 200, 300])
def test_replay_killed_mid_window_without_journal_is_left_as_of_the_last_flush(tmp_path, qemu, nth):
    """Without --journal, metadata is written back at each `flush` (and at the end): a crash in
    between rolls the image back to the last flush, whole and consistent, as QEMU's writeback
    cache would leave it at best."""
    from qdebug.engine.file.journal import journal_steps

    lines = strip_comments(random_trace(8, 200, SIZE, mix=(("write", 50), ("zero", 20), ("discard", 10),
                                                          ("multi", 20))))
    lines = [x for i, line in enumerate(lines) for x in ([line, "flush"] if i % 25 == 24 else [line])]
    trace = write_trace(tmp_path / "t.trace", lines)
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    p = subprocess.run([sys.executable, "-c", KILL_AT_NTH_WRITE, str(nth), "replay", image, trace])
    assert p.returncode == 9
    (step,) = journal_steps(image)  # the transient journal holds just the unfinished window
    assert not step.committed
    assert step.meta["index"] > 0 and lines[step.meta["index"] - 1] == "flush"
    p = qdebug("replay", image, write_trace(tmp_path / "empty", ["# nothing"]))
    assert p.returncode == 0 and b"rolled back a step an earlier run left unfinished" in p.stderr
    assert not os.path.exists(journal_path(image))
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    qemu_io_stdin(ref, lines[:step.meta["index"]])
    same_images(image, ref)
    assert qemu_check(image)[0] == 0


def test_progress_only_on_a_terminal(tmp_path, qemu):
    import pty

    lines = strip_comments(random_trace(2, 300, SIZE, mix=(("write", 70), ("discard", 30))))
    trace = write_trace(tmp_path / "t.trace", lines)
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qdebug.cli", "replay", image, trace], stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait() == 0
    assert b"replay: 300/300 commands" in out
    p = qdebug("replay", create(str(tmp_path / "b.qcow2"), SIZE), trace)
    assert p.returncode == 0 and p.stderr == b""  # not a terminal: silent


@pytest.mark.parametrize("args,message", [
    (["replay", "{img}", "{tmp}/missing.trace"], "cannot read the trace"),
    (["replay", "{tmp}/missing.qcow2", "-"], "no such file"),
    (["undo", "{img}", "--steps", "0"], "step count must be at least 1"),
    (["plan", "{img}", "read 0 4k"], "plan a write or discard"),
])
def test_write_commands_fail_in_one_line(tmp_path, qemu, args, message):
    img = create(str(tmp_path / "a.qcow2"), SIZE)
    p = qdebug(*(a.format(img=img, tmp=tmp_path) for a in args), stdin=b"")
    assert p.returncode != 0
    # argparse's usage (its continuation lines are indented)
    lines = [line for line in p.stderr.decode().splitlines() if not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0]


@pytest.mark.parametrize("args", [["1G", "-o", "cluster_size=16k,refcount_bits=64"], ["-b", "base.qcow2", "-F", "qcow2"]])
def test_create_prints_what_qemu_img_prints(tmp_path, qemu, args, monkeypatch):
    create(str(tmp_path / "base.qcow2"), "64M")
    monkeypatch.chdir(tmp_path)
    mine = qdebug("create", "img.qcow2", *args)
    qargs = [a if not a.startswith("cluster_size") else "extended_l2=on," + a for a in args]
    if "-o" not in qargs:
        qargs += ["-o", "extended_l2=on"]
    ref = qemu_img("create", "-f", "qcow2", "img.qcow2", *qargs)
    assert mine.returncode == 0 and mine.stdout == ref.stdout
