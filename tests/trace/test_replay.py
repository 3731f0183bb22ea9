"""Replay: step / back / seek are exact inverses (bytes and allocator state), on a scratch copy;
the step log records it prints; write-back and dry-run modes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdebug.engine.file.journal import journal_path, undo
from qdebug.trace.commands import parse_trace
from qdebug.trace.replay import Replay, ReplayMode, sparse_copy
from tests.qemu import create, qemu_check, qemu_img, qemu_io
from tests.trace.random_traces import random_trace

CS = 65536
SIZE = 4 << 20


def digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return os.path.getsize(path), h.hexdigest()


def host_offsets(rec) -> list[tuple[int, int, str]]:
    return [(w.offset, w.length, w.what) for w in rec.plan.host_writes]


@pytest.fixture
def image(tmp_path, qemu):
    return create(str(tmp_path / "img.qcow2"), SIZE)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 25))
def test_back_over_every_step_is_byte_identical_and_restep_repeats_host_offsets(image, seed, n):
    cmds = parse_trace(random_trace(seed, n, SIZE), "random")
    original = digest(image)
    with Replay(image, cmds, scratch=True) as s:
        states = [digest(s.path)]
        first = []
        while (rec := s.step()) is not None:
            states.append(digest(s.path))
            first.append(host_offsets(rec))
        assert s.position == len(cmds)
        while s.back() is not None:
            assert digest(s.path) == states[s.position]
        assert s.position == 0
        for i in range(len(cmds)):  # the allocator state came back too: same host offsets again
            assert host_offsets(s.step()) == first[i]
            assert digest(s.path) == states[i + 1]
    assert digest(image) == original, "a scratch session never touches the user's image"


def test_seek_reaches_the_same_state_from_either_side(image):
    cmds = parse_trace(random_trace(7, 30, SIZE), "random")
    with Replay(image, cmds, scratch=True) as s:
        states = [digest(s.path)]
        while s.step():
            states.append(digest(s.path))
        for target in (0, 17, 3, 30, 29, 12, 0, 5):
            assert s.seek(target) == target
            assert digest(s.path) == states[target]
        assert s.seek(999) == 30 and s.seek(-3) == 0


def test_replay_result_matches_qemu_io(image, tmp_path):
    """The scratch copy after all steps equals what one qemu-io process makes of the same trace."""
    lines = random_trace(11, 40, SIZE)
    ref = str(tmp_path / "ref.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ref, str(SIZE))
    qemu_io(ref, *lines, check=False)
    with Replay(image, parse_trace(lines, "random"), scratch=True) as s:
        s.seek(len(lines))
        # -U: the session holds the scratch copy like a running QEMU would
        assert qemu_img("compare", "-U", "-q", ref, s.path, check=False).returncode == 0
        assert qemu_img("check", "-U", s.path, check=False).returncode == qemu_check(ref)[0]


def test_in_place_replay_leaves_a_journal_for_qdebug_undo(image):
    original = digest(image)
    cmds = parse_trace(random_trace(3, 12, SIZE), "random")
    with Replay(image, cmds) as s:
        assert s.path == image
        s.seek(12)
        s.back()
        after = digest(image)
    assert digest(image) == after and os.path.exists(journal_path(image))
    res = undo(image, steps=None)
    assert res.undone == 11 - sum(1 for c in cmds[:11] if c.op in ("read", "flush"))
    assert digest(image) == original
    assert not os.path.exists(journal_path(image))


def test_backing_file_is_never_written(tmp_path, qemu):
    base = create(str(tmp_path / "base.qcow2"), SIZE)
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x22 2M 512k")
    top = create(str(tmp_path / "top.qcow2"), SIZE, backing=base)
    base_before, base_mtime = digest(base), os.stat(base).st_mtime_ns
    with Replay(top, parse_trace(random_trace(5, 30, SIZE), "r")) as s:
        s.seek(30)
        assert not s.chain.layers[1].writable
        s.seek(0)
    assert digest(base) == base_before and os.stat(base).st_mtime_ns == base_mtime


def test_a_command_qemu_fails_is_recorded_and_changes_nothing(image):
    cmds = parse_trace(["write -P 0x41 0 64k", "write -c -P 0x42 0 64k", "read -P 0x41 0 64k"], "t")
    with Replay(image, cmds, scratch=True) as s:
        s.step()
        before = digest(s.path)
        rec = s.step()
        assert rec.error and "Input/output error" in rec.error
        assert digest(s.path) == before
        assert s.step().error is None  # the data is still 0x41, as qemu-io reads it


def test_failed_read_pattern_is_reported(image):
    cmds = parse_trace(["write -P 0x41 0 4k", "read -P 0x42 0 4k"], "t")
    with Replay(image, cmds, scratch=True) as s:
        s.step()
        rec = s.step()
        assert rec.error.startswith("Pattern verification failed at offset 0")


def test_step_record_prints_as_json(image):
    cmds = parse_trace(["write -P 0x22 8k 4k  # a comment", "discard 0 64k", "flush"], "t")
    with Replay(image, cmds, scratch=True) as s:
        s.seek(3)
        for rec in s.records:
            data = json.loads(json.dumps(rec.to_json()))
            assert data["index"] == rec.index and data["line"] == rec.command.lineno
            assert data["log-version"] == 2 and "seconds" not in data and "requests" not in data
        w = s.records[0].to_json()
        assert w["command"] == "write -P 0x22 8k 4k"
        (c,) = w["clusters"]
        assert c["cluster"] == 0 and c["after"] != c["before"]
        assert any(h["what"] == "data" for h in w["host-writes"])
        full = s.records[0].to_json(plan=True, timing=True)
        plan = s.records[0].plan.to_json()
        # the full record is the plan's own JSON (same keys, same values) plus the step's place
        # ... and what the step cost (cost.StepCost: with the plan, or asked for)
        assert {k: v for k, v in full.items() if k not in ("log-version", "index", "seconds", "cost")} == \
            {**plan, "command": w["command"]}
        assert "cost" not in w and full["cost"] == s.records[0].to_json(cost=True)["cost"] == \
            s.records[0].cost.to_json()
        assert (full["cost"]["guest-write-bytes"], full["cost"]["cow-bytes"]) == (4096, 0)
        assert full["seconds"] >= 0
        assert full["requests"][0]["l2-metas"][0]["cow-start"] == {"offset": 8192, "length": 0}


def test_write_back_and_dry_runs_cannot_step_back(image):
    for mode in (ReplayMode.WRITE_BACK, ReplayMode.DRY_RUN):
        with Replay(image, parse_trace(["write 0 4k"], "t"), mode=mode) as s:
            s.step()
            assert s.back() is None  # nothing is kept to step back to


def test_dry_run_writes_nothing_and_plans_each_step_after_the_last(image):
    original = digest(image)
    cmds = parse_trace(["write -P 1 0 4k", "write -P 2 4k 4k"], "t")
    with Replay(image, mode=ReplayMode.DRY_RUN) as s:
        first, second = (s.step(c) for c in cmds)
        assert first.plan.clusters[0].bitmap_after == second.plan.clusters[0].bitmap_before
        assert second.plan.requests[0].metas[0].keep_old  # the cluster the first write allocated
    assert digest(image) == original
    os.chmod(image, 0o444)  # a dry run reads: a read-only file is enough
    try:
        with Replay(image, mode=ReplayMode.DRY_RUN) as s:
            assert s.step(cmds[0]).error is None
    finally:
        os.chmod(image, 0o644)


_MID_STEP = """
import json, sys
from qdebug.engine.write import datapath
from qdebug.trace.commands import parse_line
from qdebug.trace.replay import Replay

seen = []
real = datapath.link_l2

def spy(ctx, m, *args):
    seen.append(ctx.trace.plan(ctx.entry).to_json())
    return real(ctx, m, *args)

datapath.link_l2 = spy
with Replay(sys.argv[1], scratch=True) as s:
    rec = s.step(parse_line("write -P 3 60k 8k"))
print(json.dumps({"mid": seen, "end": rec.plan.to_json(), "compiled": datapath.__file__.endswith(".so")}))
"""


def test_plan_at_any_point_of_a_step(image):
    """The plan is built from plain data the step records, so it can be printed half-way through
    a step (pure Python: a compiled module's internal calls cannot be spied on)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _MID_STEP, image], capture_output=True, text=True,
                       env={**os.environ, "QDEBUG_NATIVE": "0"})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert not out["compiled"]
    (mid,) = out["mid"]  # one L2Meta for the two clusters: link_l2 runs once
    assert mid["requests"] == [] and mid["clusters"] == []  # nothing linked yet...
    assert [a["what"] for a in mid["allocations"]] == ["L2 table", "data"]  # ...but allocated
    assert [w["what"] for w in mid["host-writes"]][-1] == "data"
    end = out["end"]
    assert len(end["requests"]) == 1 and [c["cluster"] for c in end["clusters"]] == [0, 1]
    assert end["host-writes"][:len(mid["host-writes"])] == mid["host-writes"]


def test_sparse_copy_keeps_holes(tmp_path):
    src = str(tmp_path / "sparse")
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(30 << 20)
        f.write(b"x" * 4096)
    dst = str(tmp_path / "copy")
    sparse_copy(src, dst)
    assert digest(src) == digest(dst)
    assert os.stat(dst).st_blocks * 512 < 1 << 20


@pytest.mark.slow
def test_step_and_back_through_a_long_trace_on_a_64g_image(tmp_path, qemu):
    """200 steps forward and all the way back on a 64 GiB image with a backing file: the scratch
    copy ends byte for byte as it started. (How fast a step is lives in benchmarks/bench_tui.py:
    timed assertions here flaked on the shared CI machines.)"""
    base = create(str(tmp_path / "base.qcow2"), "64G")
    qemu_io(base, "write -P 0x5 0 4M", "write -P 0x6 32G 4M")
    top = create(str(tmp_path / "top.qcow2"), "64G", backing=base)
    lines = random_trace(1, 200, 64 << 30, mix=(("write", 60), ("zero", 20), ("discard", 10), ("multi", 10)))
    with Replay(top, parse_trace(lines, "r"), scratch=True) as s:
        start = digest(s.path)
        for _ in range(200):
            assert s.step().error is None
        assert digest(s.path) != start
        for _ in range(200):
            s.back()
        assert s.position == 0 and digest(s.path) == start
