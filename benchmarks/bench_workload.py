"""`qdebug whatif` and `qdebug stats` against one `qemu-io -t writeback` replay of the same trace,
as ratios measured side by side in one run (issue #14).

The trace: a real fio random-write job (4 KiB blocks, QDEBUG_BENCH_WORKLOAD_N writes, default
100000, over 2 GiB; fio's null engine makes the iolog without writing a scratch file) imported with
`qdebug trace import --from fio`. The image: 2 GiB, 64 KiB clusters with extended L2, over a qcow2
backing file holding data. Targets: whatif over 6 geometries (64k, 128k, 2M x extended L2 on/off,
--jobs 2, the machine's two cores) in no more time than qemu-io's one replay (ratio >= 1), every
process under 512 MiB; stats >= 5x faster than the replay.
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
from tests.trace.fio_jobs import FIO, require_fio

N = int(os.environ.get("QDEBUG_BENCH_WORKLOAD_N", "100000"))
ROUNDS = int(os.environ.get("QDEBUG_BENCH_WORKLOAD_ROUNDS", "1"))
SIZE = 2 << 30
MEMORY_LIMIT = 512 << 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_qemu()
    require_fio()
    d = tmp_path_factory.mktemp("workload")
    log = str(d / "rw.iolog")
    p = subprocess.run([FIO, "--name=rw", f"--filename={d / 'fio.dat'}", f"--size={SIZE}", "--rw=randwrite",
                        "--bs=4k", f"--number_ios={N}", "--norandommap", "--ioengine=null", "--randseed=7",
                        f"--write_iolog={log}", "--output=/dev/null"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    trace = str(d / "trace")
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "trace", "import", log, "-o", trace, "--from", "fio"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    base = create(str(d / "base.qcow2"), SIZE)
    qemu_io(base, *(f"write -q -P 0x{i + 1:02x} {i * (SIZE // 16)} 16M" for i in range(16)))
    top = create(str(d / "top.qcow2"), SIZE, cluster_size="64k", extended_l2=True, backing=base, backing_fmt="qcow2")
    return d, base, top, trace


def time_qemu_io(d, top: str, trace: str) -> float:
    img = str(d / "qemu.qcow2")
    shutil.copyfile(top, img)
    os.sync()
    with open(trace, "rb") as f:
        t = time.perf_counter()
        p = subprocess.run([QEMU_IO, "-t", "writeback", "-f", "qcow2", img], stdin=f, capture_output=True)
        elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr.decode()
    os.unlink(img)
    return elapsed


# runs qdebug and reports the largest resident set among it and its workers (ru_maxrss of the
# children of this small wrapper only: nothing else the benchmark ran counts)
_MEASURED = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")


def time_qdebug(*args: str) -> tuple[float, int]:
    """Seconds, and the largest resident set of the qdebug process or any of its workers."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", "qdebug.cli", *args],
                       capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr[-2000:]
    return elapsed, int(p.stderr.split()[-1]) * 1024


def record(benchmark, report, name: str, qemu_s: float, qdebug_s: float, rss: int, target: float) -> None:
    ratio = qemu_s / qdebug_s
    benchmark.extra_info.update({"commands": N, "qdebug_s": round(qdebug_s, 3), "qemu_io_s": round(qemu_s, 3),
                                 "ratio": round(ratio, 2), "max_rss_mib": rss >> 20, "target": target})
    report(f"{name}: {N} commands, qdebug {qdebug_s:.2f} s (largest process {rss >> 20} MiB), one qemu-io -t "
           f"writeback replay {qemu_s:.2f} s: ratio {ratio:.2f}x (target >= {target:g}x)"
           + ("" if ratio >= target else "  BELOW TARGET"))


def side_by_side(d, top: str, trace: str, *args: str) -> tuple[float, float, int]:
    qemu_s, qdebug_s, rss = [], [], 0
    for _ in range(ROUNDS):
        qemu_s.append(time_qemu_io(d, top, trace))
        s, r = time_qdebug(*args)
        qdebug_s.append(s)
        rss = max(rss, r)
    return statistics.median(qemu_s), statistics.median(qdebug_s), rss


def test_whatif_six_geometries_vs_one_qemu_io_replay(benchmark, report, setup):
    d, base, top, trace = setup
    args = ("whatif", trace, "--size", str(SIZE), "-b", base, "-F", "qcow2", "--cluster-size", "64k,128k,2M",
            "--extended-l2", "on,off", "--jobs", "2", "--output=json")
    qemu_s, qdebug_s, rss = benchmark.pedantic(side_by_side, args=(d, top, trace, *args), rounds=1, iterations=1)
    record(benchmark, report, "whatif (6 geometries, --jobs 2)", qemu_s, qdebug_s, rss, 1)
    assert rss < MEMORY_LIMIT


def test_stats_vs_qemu_io_replay(benchmark, report, setup):
    d, base, top, trace = setup
    qemu_s, qdebug_s, rss = benchmark.pedantic(side_by_side, args=(d, top, trace, "stats", top, trace),
                                               rounds=1, iterations=1)
    record(benchmark, report, "stats", qemu_s, qdebug_s, rss, 5)
    assert rss < MEMORY_LIMIT
