"""Replay speed: `qdebug replay` and `qdebug replay --dry-run` against `qemu-io -t writeback` on the
same trace, as ratios measured side by side in one run.

The trace (issue 3, item 7): 60% writes of 512 B..64 KiB at 512-aligned offsets, 20% zero writes, 10%
discards, 10% multi-cluster writes, over a 64 GiB image, once with a qcow2 backing file and once
without. Every tool starts as a process and reads the whole trace (qemu-io from stdin, one process);
each run gets a fresh copy of the image. The machines are shared and noisy, so the tools run
interleaved (qemu-io, qdebug, qemu-io, ...) QDEBUG_BENCH_REPLAY_ROUNDS times and the ratio of the
median times is reported. QDEBUG_BENCH_REPLAY_N sets the trace length (default 100000, the issue's
figure: qemu-io slows down as the image fills, ~5,000 commands/s over the first 20k, ~3,800/s over
100k, so shorter traces give lower ratios, and qdebug's start-up (~0.25 s) weighs more on them).
The durable-journal run (an fsync before every image write) uses a tenth of it
(QDEBUG_BENCH_JOURNAL_N). qdebug runs as `make install` left it: with the compiled engine
(qdebug/native.py) unless QDEBUG_NATIVE=0. Targets: replay no slower than qemu-io (ratio >= 1), --dry-run planning
>= 5x qemu-io's execution. The ratios are printed again in the terminal summary.
QDEBUG_BENCH_BYTECODE=1 runs qdebug with its bytecode cached (see conftest.py).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

from tests.qemu import QEMU_IO, create, qemu_io, require_qemu
from tests.trace.random_traces import BENCH_MIX, random_trace

N = int(os.environ.get("QDEBUG_BENCH_REPLAY_N", "100000"))
N_JOURNAL = int(os.environ.get("QDEBUG_BENCH_JOURNAL_N", str(max(1, N // 10))))
ROUNDS = int(os.environ.get("QDEBUG_BENCH_REPLAY_ROUNDS", "2"))
SIZE = 64 << 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bytecode):
    """backing kind -> (directory, top image); and the two trace files."""
    require_qemu()
    d = tmp_path_factory.mktemp("replay")
    base = create(str(d / "base.qcow2"), "64G")
    qemu_io(base, *(f"write -q -P 0x{i:02x} {i * 1 << 30} 8M" for i in range(0, 64, 4)))
    images = {"qcow2 backing": create(str(d / "top.qcow2"), "64G", backing=base),
              "no backing": create(str(d / "plain.qcow2"), "64G")}
    lines = random_trace(2024, N, SIZE, mix=BENCH_MIX)
    trace, short = d / "trace", d / "trace.short"
    trace.write_text("\n".join(lines) + "\n")
    short.write_text("\n".join(lines[:N_JOURNAL]) + "\n")
    return d, images, str(trace), str(short)


def fresh_copy(d, top: str, name: str) -> str:
    """A fresh copy of the image, and no dirty page cache left by the previous run: each tool
    starts from the same state (the kernel's write-back of ~2 GB of an earlier run's data
    otherwise competes for the 2 cores while the next one is timed)."""
    path = str(d / name)
    shutil.copyfile(top, path)
    for stale in ("qemu.qcow2", "qdebug.qcow2"):
        if stale != name and os.path.exists(d / stale):
            os.unlink(d / stale)
    os.sync()
    return path


def time_qemu_io(d, top: str, trace: str) -> float:
    img = fresh_copy(d, top, "qemu.qcow2")
    with open(trace, "rb") as f:
        t = time.perf_counter()
        p = subprocess.run([QEMU_IO, "-t", "writeback", "-f", "qcow2", img], stdin=f, capture_output=True)
        elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr.decode()
    return elapsed


def time_qdebug(d, top: str, trace: str, *extra: str) -> float:
    img = fresh_copy(d, top, "qdebug.qcow2")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "replay", *extra, img, trace], capture_output=True)
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return elapsed


def side_by_side(d, top: str, trace: str, *extra: str, rounds: int = ROUNDS) -> tuple[float, float]:
    """Median seconds of (qemu-io, qdebug), the two run alternately so both see the same load."""
    qemu_s, qdebug_s = [], []
    for _ in range(rounds):
        qemu_s.append(time_qemu_io(d, top, trace))
        qdebug_s.append(time_qdebug(d, top, trace, *extra))
    return statistics.median(qemu_s), statistics.median(qdebug_s)


def record(benchmark, report, name: str, qemu_s: float, qdebug_s: float, n: int, target: float) -> None:
    ratio = qemu_s / qdebug_s
    benchmark.extra_info.update({"commands": n, "qdebug_s": round(qdebug_s, 3), "qemu_io_s": round(qemu_s, 3),
                                 "speedup_vs_qemu_io": round(ratio, 2), "target": target})
    report(f"{name}: {n} commands, qdebug {qdebug_s:.2f} s ({n / qdebug_s:,.0f}/s), qemu-io -t writeback "
           f"{qemu_s:.2f} s ({n / qemu_s:,.0f}/s): ratio {ratio:.2f}x (target >= {target:g}x)"
           + ("" if ratio >= target else "  BELOW TARGET"))


BACKINGS = ("qcow2 backing", "no backing")


@pytest.mark.parametrize("backing", BACKINGS)
def test_replay_vs_qemu_io(benchmark, report, setup, backing):
    d, images, trace, _short = setup
    qemu_s, qdebug_s = benchmark.pedantic(side_by_side, args=(d, images[backing], trace), rounds=1, iterations=1)
    record(benchmark, report, f"replay ({backing})", qemu_s, qdebug_s, N, 1)


@pytest.mark.parametrize("backing", BACKINGS)
def test_dry_run_planning_vs_qemu_io(benchmark, report, setup, backing):
    d, images, trace, _short = setup
    qemu_s, qdebug_s = benchmark.pedantic(side_by_side, args=(d, images[backing], trace, "--dry-run"),
                                          rounds=1, iterations=1)
    record(benchmark, report, f"replay --dry-run ({backing})", qemu_s, qdebug_s, N, 5)


def test_replay_with_durable_journal_vs_qemu_io(benchmark, report, setup):
    """The cost of crash-safe undo (fsync before every image write), for the record."""
    d, images, _trace, short = setup
    qemu_s, qdebug_s = benchmark.pedantic(side_by_side, args=(d, images["qcow2 backing"], short, "--journal"),
                                          kwargs={"rounds": 1}, rounds=1, iterations=1)
    record(benchmark, report, "replay --journal (qcow2 backing)", qemu_s, qdebug_s, N_JOURNAL, 0)
