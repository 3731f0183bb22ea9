"""Read-side benchmarks on 1 TiB extended-L2 images, side by side with QEMU's tools.

Each QEMU run is made in the untimed `setup` of the same pedantic round as the qdebug run it is
compared with, so both see the same machine load; the ratio printed is QEMU median / qdebug median.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.read.summary import subcluster_counts

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
ROUNDS = int(os.environ.get("QDEBUG_BENCH_ROUNDS", "3"))
ENFORCE = os.environ.get("QDEBUG_BENCH_ENFORCE") == "1"
MEMORY_LIMIT = 512 << 20
QDEBUG = [sys.executable, "-m", "qdebug.cli"]


# ru_maxrss of a child counts the RSS its parent had when it forked (exec keeps the old mm's high
# water mark), which here would be pytest's own. So each measured command is started by this small
# wrapper (a bare Python, about 10 MiB) and the wrapper reports its child's peak.
_RSS_WRAPPER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: list[str], out_path: str) -> tuple[float, int, float]:
    """Wall time, peak RSS (bytes) and CPU time (user + system) of one command, its stdout sent to
    out_path. CPU time is reported too because these shared machines are often overloaded, which
    stretches wall times unevenly."""
    rss_file = out_path + ".rss"
    with open(out_path, "wb") as out, open(out_path + ".err", "wb") as err:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-S", "-c", _RSS_WRAPPER, rss_file, *argv], stdout=out, stderr=err)
        elapsed = time.perf_counter() - t
    if p.returncode:
        with open(out_path + ".err") as f:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {f.read()[:500]}")
    with open(rss_file) as f:
        rss, cpu = f.read().split()
    return elapsed, int(rss) * 1024, float(cpu)


def compare(benchmark, report, what: str, ours: list[str], theirs: list[str], tmp_path, *, same_output: bool):
    """Time `ours` with pytest-benchmark and `theirs` in the same rounds; report ratio and memory."""
    qemu_times: list[float] = []
    qemu_cpu: list[float] = []
    rss: list[int] = []
    our_cpu: list[float] = []
    ours_out, theirs_out = str(tmp_path / "ours.out"), str(tmp_path / "theirs.out")

    def run_qemu():
        wall, _rss, cpu = run_measured(theirs, theirs_out)
        qemu_times.append(wall)
        qemu_cpu.append(cpu)

    def run_ours():
        _wall, peak, cpu = run_measured(ours, ours_out)
        rss.append(peak)
        our_cpu.append(cpu)

    benchmark.pedantic(run_ours, setup=run_qemu, rounds=ROUNDS, iterations=1)
    if same_output:
        assert filecmp.cmp(ours_out, theirs_out, shallow=False), f"{what}: output differs from QEMU's"
    mine = benchmark.stats.stats.median
    ratio = statistics.median(qemu_times) / mine
    cpu_ratio = statistics.median(qemu_cpu) / statistics.median(our_cpu)
    benchmark.extra_info.update(ratio=round(ratio, 2), qemu_median_s=round(statistics.median(qemu_times), 3),
                                cpu_ratio=round(cpu_ratio, 2), peak_rss_mib=round(max(rss) / 2**20, 1))
    report(f"{what:<58} qdebug {mine:7.3f} s  qemu {statistics.median(qemu_times):7.3f} s  "
           f"ratio {ratio:5.2f}x  (CPU {statistics.median(our_cpu):.2f} s vs {statistics.median(qemu_cpu):.2f} s: "
           f"{cpu_ratio:5.2f}x)  qdebug peak RSS {max(rss) / 2**20:6.1f} MiB")
    assert max(rss) < MEMORY_LIMIT, f"{what}: peak RSS {max(rss)} bytes"
    return ratio


@pytest.mark.parametrize("name", ["fragmented", "prealloc+fragmented", "prealloc"])
def test_map_json(benchmark, report, bench_images, tmp_path, name):
    """(b) qdebug map --output=json vs qemu-img map --output=json; output must be identical."""
    img = bench_images[name]
    ratio = compare(benchmark, report, f"map --output=json, {name}", QDEBUG + ["map", "--output=json", img],
                    [QEMU_IMG, "map", "--output=json", img], tmp_path, same_output=True)
    if ENFORCE and name != "prealloc":
        assert ratio >= 3, f"map on {name}: only {ratio:.2f}x faster than qemu-img"


@pytest.mark.parametrize("name", ["prealloc", "fragmented"])
def test_info(benchmark, report, bench_images, tmp_path, name):
    """(c) qdebug info (which also classifies every subcluster) vs qemu-img info (which does not)."""
    img = bench_images[name]
    compare(benchmark, report, f"info --output=json, {name} (qdebug also counts subclusters)",
            QDEBUG + ["info", "--output=json", img], [QEMU_IMG, "info", "--output=json", img], tmp_path,
            same_output=False)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cache", ["hot", "cold"])
def test_classify_prealloc(benchmark, report, bench_images, tmp_path, cache):
    """(a) summary.subcluster_counts of every L2 entry of the preallocated image (16M entries for
    1 TiB), in-process; compared with the CPU time of `qemu-img check`, QEMU's own whole-metadata
    scan (for scale only: check does more than classify)."""
    path = bench_images["prealloc"]
    img = open_image(path)
    check_times: list[float] = []

    def setup():
        check_times.append(run_measured([QEMU_IMG, "check", "--output=json", path], str(tmp_path / "check"))[2])
        if cache == "cold":
            _drop_cache(path)

    try:
        counts = benchmark.pedantic(subcluster_counts, args=(img,), setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        img.close()
    h_entries = img.header.guest_clusters
    assert counts["UNALLOCATED_ALLOC"] == h_entries * 32 and sum(counts.values()) == h_entries * 32
    mine = benchmark.stats.stats.median
    ratio = statistics.median(check_times) / mine
    benchmark.extra_info.update(l2_entries=h_entries, ratio_vs_qemu_img_check=round(ratio, 2))
    report(f"{'classify ' + f'{h_entries:,}' + ' L2 entries, ' + cache + ' cache':<58} qdebug {mine:7.3f} s  "
           f"qemu-img check CPU {statistics.median(check_times):7.3f} s  ratio {ratio:5.2f}x  "
           f"({h_entries / mine / 1e6:.1f}M entries/s, target < 1 s: {'met' if mine < 1 else 'MISSED'})")
    if ENFORCE:
        assert mine < 1.0
