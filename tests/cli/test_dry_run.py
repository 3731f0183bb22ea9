"""`qdebug replay --dry-run`: the plans of a whole trace, each after the commands before it.

Oracle: a real `qdebug replay` of the same trace on a copy (the real replay is itself checked against
QEMU by the differential tests). For random traces over random images the step logs must be equal
(plans, host writes, bitmaps before/after, COW ranges and sources, hazards, errors), and the dry run
must leave the image's bytes and modification time as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import pytest

from qdebug.cli import main
from qdebug.engine.file.journal import journal_path
from tests.qemu import create, qemu_io
from tests.trace.random_traces import random_trace

TRACES = int(os.environ.get("QDEBUG_DRY_RUN_TRACES", "12"))
SIZE = 8 << 20


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _steps(log: str) -> list[dict]:
    with open(log) as f:
        steps = [json.loads(line) for line in f]
    assert not any("seconds" in s for s in steps)  # only with --log-timing: logs of one trace diff equal
    return steps


def _random_image(tmp_path, rng: random.Random) -> tuple[str, int]:
    cs = rng.choice([16384, 65536, 65536, 262144])
    ext = rng.random() < 0.8
    backing = rng.choice(["none", "qcow2", "raw", "short"])
    base = None
    if backing == "raw":
        base = str(tmp_path / "base.raw")
        with open(base, "wb") as f:
            f.write(rng.randbytes(1 << 20) * 2)
            f.truncate(SIZE)
    elif backing != "none":
        base = create(str(tmp_path / "base.qcow2"), SIZE // 2 if backing == "short" else SIZE)
        qemu_io(base, "write -P 0x5b 0 1M", "write -z 2M 1M", "write -P 0x6c 3M 512k")
    top = create(str(tmp_path / "top.qcow2"), SIZE, cluster_size=str(cs), extended_l2=ext,
                 backing=base, backing_fmt="raw" if backing == "raw" else "qcow2")
    if rng.random() < 0.5:  # some clusters already there before the trace
        qemu_io(top, "write -P 0x11 0 300k", "write -c -P 0x22 1M 64k" if cs == 65536 else "write -z 1M 64k")
    return top, cs


@pytest.mark.parametrize("seed", range(TRACES))
def test_dry_run_plans_equal_the_real_replay(tmp_path, qemu, seed, capsys):
    rng = random.Random(4000 + seed)
    image, cs = _random_image(tmp_path, rng)
    copy = str(tmp_path / "copy.qcow2")
    shutil.copyfile(image, copy)
    trace = tmp_path / "t.trace"
    trace.write_text("\n".join(random_trace(seed, rng.randrange(20, 80), SIZE, cs)) + "\n")
    before, mtime = _digest(image), os.stat(image).st_mtime_ns
    dry_log, real_log = str(tmp_path / "dry.jsonl"), str(tmp_path / "real.jsonl")

    dry_rc = main(["replay", "--dry-run", "--keep-going", "--log", dry_log, "--log-plans", image, str(trace)])
    dry_err = capsys.readouterr().err
    assert _digest(image) == before and os.stat(image).st_mtime_ns == mtime
    assert not os.path.exists(journal_path(image))
    real_rc = main(["replay", "--keep-going", "--log", real_log, "--log-plans", copy, str(trace)])
    real_err = capsys.readouterr().err

    dry, real = _steps(dry_log), _steps(real_log)
    assert len(dry) == len(real)
    for d, r in zip(dry, real):
        assert d == r, f"step {r['index']} (line {r['line']}: {r['command']}) differs"
    assert dry_rc == real_rc
    assert dry_err.replace(image, "IMG") == real_err.replace(copy, "IMG")
    assert any(s["requests"] for s in real)


def test_dry_run_sees_its_own_earlier_steps(tmp_path, qemu):
    """A write into a cluster an earlier step allocated is planned in place, as the replay does it."""
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    trace = tmp_path / "t.trace"
    trace.write_text("write -P 1 0 4k\nwrite -P 2 8k 4k\n")
    log = str(tmp_path / "dry.jsonl")
    assert main(["replay", "--dry-run", "--log", log, "--log-plans", image, str(trace)]) == 0
    first, second = _steps(log)
    meta1 = first["requests"][0]["l2-metas"][0]
    meta2 = second["requests"][0]["l2-metas"][0]
    assert not meta1["keep-old"] and meta2["keep-old"]
    assert meta2["alloc-offset"] == meta1["alloc-offset"]
    assert second["clusters"][0]["before"] == first["clusters"][0]["after"]
