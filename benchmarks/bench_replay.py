"""Replay speed: `qdebug replay` against `qemu-io -t writeback` on the same trace, as a ratio in one run.

The trace (issue 3, item 7): 60% writes of 512 B..64 KiB at 512-aligned offsets, 20% zero writes, 10%
discards, 10% multi-cluster writes, over a 64 GiB image with a qcow2 backing file. Both tools start
as a process and read the whole trace (qemu-io from stdin, one process); each gets a fresh copy of
the image. QDEBUG_BENCH_REPLAY_N sets the trace length: default 5000, because qdebug's write engine
does a few hundred commands/s today and `make bench` should end in minutes (the issue's figure is
100000). The durable-journal run (an fsync before every image write) uses a tenth of it
(QDEBUG_BENCH_JOURNAL_N). Targets: replay no slower than qemu-io (ratio >= 1), --dry-run planning
>= 5x qemu-io.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.qemu import QEMU_IO, create, qemu_io, require_qemu
from tests.trace.random_traces import BENCH_MIX, random_trace

N = int(os.environ.get("QDEBUG_BENCH_REPLAY_N", "5000"))
N_JOURNAL = int(os.environ.get("QDEBUG_BENCH_JOURNAL_N", str(max(1, N // 10))))
SIZE = 64 << 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_qemu()
    d = tmp_path_factory.mktemp("replay")
    base = create(str(d / "base.qcow2"), "64G")
    qemu_io(base, *(f"write -q -P 0x{i:02x} {i * 1 << 30} 8M" for i in range(0, 64, 4)))
    top = create(str(d / "top.qcow2"), "64G", backing=base)
    lines = random_trace(2024, N, SIZE, mix=BENCH_MIX)
    trace, short = d / "trace", d / "trace.short"
    trace.write_text("\n".join(lines) + "\n")
    short.write_text("\n".join(lines[:N_JOURNAL]) + "\n")
    return d, top, str(trace), str(short)


@pytest.fixture(scope="module")
def qemu_seconds(setup):
    """qemu-io's time for the whole trace, measured once in this run and shared by the ratios."""
    d, top, trace, _short = setup
    return time_qemu_io(d, top, trace)


def fresh_copy(d, top: str, name: str) -> str:
    path = str(d / name)
    shutil.copyfile(top, path)
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


def report(benchmark, name: str, qdebug_s: float, qemu_s: float, n: int = N) -> None:
    ratio = qemu_s / qdebug_s
    benchmark.extra_info.update({"commands": n, "qdebug_s": round(qdebug_s, 3), "qemu_io_s": round(qemu_s, 3),
                                 "speedup_vs_qemu_io": round(ratio, 2)})
    print(f"\n{name}: {n} commands, qdebug {qdebug_s:.2f} s ({n / qdebug_s:,.0f}/s), qemu-io -t writeback "
          f"{qemu_s:.2f} s ({n / qemu_s:,.0f}/s): qdebug is {ratio:.2f}x qemu-io's speed")


def test_replay_vs_qemu_io(benchmark, setup, qemu_seconds):
    d, top, trace, _short = setup
    qdebug_s = benchmark.pedantic(time_qdebug, args=(d, top, trace), rounds=1, iterations=1)
    report(benchmark, "replay", qdebug_s, qemu_seconds)


def test_dry_run_planning_vs_qemu_io(benchmark, setup, qemu_seconds):
    d, top, trace, _short = setup
    qdebug_s = benchmark.pedantic(time_qdebug, args=(d, top, trace, "--dry-run"), rounds=1, iterations=1)
    report(benchmark, "replay --dry-run", qdebug_s, qemu_seconds)


def test_replay_with_durable_journal_vs_qemu_io(benchmark, setup):
    """The cost of crash-safe undo (fsync before every image write), for the record."""
    d, top, _trace, short = setup
    qemu_s = time_qemu_io(d, top, short)
    qdebug_s = benchmark.pedantic(time_qdebug, args=(d, top, short, "--journal"), rounds=1, iterations=1)
    report(benchmark, "replay --journal", qdebug_s, qemu_s, N_JOURNAL)
