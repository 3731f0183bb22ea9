"""`qdebug scan` of a fleet vs one `qemu-img check` process per image (`find | xargs -P2 -n1`),
same run, same images; then the same scan on a 2-worker dask.distributed LocalCluster.

The fleet: QDEBUG_BENCH_SCAN_IMAGES (default 2000) small extended-L2 images (4 MiB virtual, about
half a MiB of file each), copies of a few templates made by QEMU (tests/scan/fleet.py); every tenth
is a copy of a damaged template (every corruption of tests/engine/corruptions.py that applies).
Kept in QDEBUG_BENCH_DIR when that is set. Verdicts and counts of every image must be identical to
qemu-img's; the ratio printed is QEMU time / qdebug time, and the peak RSS of the largest worker.
QDEBUG_BENCH_ENFORCE=1 fails below 5x for the local scan.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

import pytest
from bench_read import _RSS_WRAPPER, ENFORCE, QEMU_IMG, ROUNDS

from tests.qemu import require_qemu
from tests.scan.fleet import make_fleet, make_templates

IMAGES = int(os.environ.get("QDEBUG_BENCH_SCAN_IMAGES", "2000"))
JOBS = 2
SHAPES = ("ext64k", "ext16k", "ext32k-snap", "ext64k-bitmaps")
QDEBUG = [sys.executable, "-m", "qdebug.cli"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_qemu()
    where = os.environ.get("QDEBUG_BENCH_DIR") or str(tmp_path_factory.mktemp("scan"))
    root = os.path.join(where, f"fleet-{IMAGES}")
    if not os.path.exists(os.path.join(root, "done")):
        t = time.perf_counter()
        templates = make_templates(os.path.join(root, "templates"), SHAPES)
        make_fleet(os.path.join(root, "images"), templates, IMAGES)
        open(os.path.join(root, "done"), "w").close()
        print(f"\nbuilt a fleet of {IMAGES} images ({len(templates[1])} damaged templates) in "
              f"{time.perf_counter() - t:.1f} s")
    return os.path.join(root, "images")


def _measured(argv: list[str], tmp: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall time, CPU time (user + system, with every process it waited for: workers, qemu-img
    processes) and the result of one command. CPU time is printed beside wall time because these
    shared 2-core machines are often loaded by others, which stretches wall times unevenly."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-S", "-c", _RSS_WRAPPER, tmp, *argv], capture_output=True)
    elapsed = time.perf_counter() - t
    with open(tmp) as f:
        cpu = float(f.read().split()[1])
    return elapsed, cpu, p


def _qemu_xargs(images: str, tmp: str) -> tuple[float, float, dict[str, dict]]:
    """`find | xargs -P2 -n1 qemu-img check --output=json`: wall and CPU time, filename -> qemu-img's object."""
    elapsed, cpu, p = _measured(["sh", "-c", f"find '{images}' -type f | xargs -P{JOBS} -n1 {QEMU_IMG} check "
                                 "--output=json"], tmp)
    out = p.stdout.decode()
    objs, dec, i = {}, json.JSONDecoder(), 0
    while True:
        while i < len(out) and out[i].isspace():
            i += 1
        if i >= len(out):
            break
        obj, i = dec.raw_decode(out, i)
        objs[obj["filename"]] = obj
    return elapsed, cpu, objs


def _qdebug(args: list[str], tmp: str) -> tuple[float, float, dict[str, dict], str]:
    elapsed, cpu, p = _measured(QDEBUG + ["scan", "--output=json", *args], tmp)
    if p.returncode not in (0, 1, 2, 3):
        raise AssertionError(f"qdebug scan exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    records = {}
    for line in p.stdout.decode().splitlines():
        r = json.loads(line)
        records[r["filename"]] = r
    return elapsed, cpu, records, p.stderr.decode()


def _same_verdicts(ours: dict[str, dict], theirs: dict[str, dict], images: str) -> None:
    """Every image: qemu-img check's counts and exit code (derived from its counts, as it exits)."""
    paths = {os.path.join(d, f) for d, _, fs in os.walk(images) for f in fs}
    assert set(ours) == paths
    for path, r in ours.items():
        q = theirs.get(path)
        if q is None:  # qemu-img could not open it: neither could we, or the check failed the same way
            assert "error" in r or r["check-exit-code"] == 1, r
            continue
        counts = {k: v for k, v in r.items() if k not in ("findings", "check-exit-code", "signatures")}
        assert counts == q, path
        code = 1 if q.get("check-errors") else 2 if q.get("corruptions") else 3 if q.get("leaks") else 0
        assert r["check-exit-code"] == code, path


def _peak_mib(stderr: str) -> float:
    m = re.search(r"peak memory per worker ([\d.]+) (KiB|MiB|GiB)", stderr)
    assert m, stderr[-500:]
    return float(m.group(1)) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[m.group(2)]


def _bench(benchmark, report, fleet, tmp_path, what: str, args: list[str]) -> float:
    qemu_times: list[float] = []
    qemu_cpu: list[float] = []
    our_cpu: list[float] = []
    runs: list[tuple[dict, str]] = []
    theirs: dict = {}

    def run_qemu():
        elapsed, cpu, objs = _qemu_xargs(fleet, str(tmp_path / "qemu.rusage"))
        qemu_times.append(elapsed)
        qemu_cpu.append(cpu)
        theirs.update(objs)

    def run_ours():
        _elapsed, cpu, records, stderr = _qdebug(args + [fleet], str(tmp_path / "ours.rusage"))
        our_cpu.append(cpu)  # the scan process and its workers (forked children it waits for)
        runs.append((records, stderr))

    benchmark.pedantic(run_ours, setup=run_qemu, rounds=ROUNDS, iterations=1)
    for records, _ in runs:
        _same_verdicts(records, theirs, fleet)
    mine = benchmark.stats.stats.median
    ratio = statistics.median(qemu_times) / mine
    cpu_ratio = statistics.median(qemu_cpu) / statistics.median(our_cpu)
    cpu = (f"(CPU {statistics.median(our_cpu):.2f} s vs {statistics.median(qemu_cpu):.2f} s: {cpu_ratio:5.2f}x)  "
           if "--dask" not in args else "")  # a Dask worker's CPU time covers its whole life
    peak = max(_peak_mib(stderr) for _, stderr in runs)
    damaged = sum(1 for r in runs[0][0].values() if r.get("check-exit-code", 1))
    benchmark.extra_info.update(ratio=round(ratio, 2), cpu_ratio=round(cpu_ratio, 2), images=IMAGES,
                                peak_worker_rss_mib=round(peak, 1))
    report(f"{what:<44} {IMAGES} images ({damaged} not clean): qdebug {mine:6.2f} s ({IMAGES / mine:5.0f}/s)  "
           f"qemu-img {statistics.median(qemu_times):6.2f} s  ratio {ratio:5.2f}x  {cpu}"
           f"peak RSS per worker {peak:5.1f} MiB")
    return ratio


def test_scan_local(benchmark, report, fleet, bytecode, tmp_path):
    ratio = _bench(benchmark, report, fleet, tmp_path, f"scan --jobs {JOBS} vs xargs -P{JOBS} qemu-img check",
                   ["--jobs", str(JOBS)])
    if ENFORCE:
        assert ratio >= 5, f"scan: only {ratio:.2f}x faster than xargs qemu-img check"


def test_scan_dask_local_cluster(benchmark, report, fleet, bytecode, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=JOBS, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster:
        _bench(benchmark, report, fleet, tmp_path, f"scan --dask (LocalCluster, {JOBS} workers) vs xargs",
               ["--dask", cluster.scheduler_address])
