"""Big images for the read-side benchmarks, built once per session with qemu-img / qemu-io.

Sizes scale with environment variables (defaults keep `make bench` to a few minutes on 2 cores):
  QDEBUG_BENCH_SIZE    virtual size of every image (qemu-img syntax, default 1T)
  QDEBUG_BENCH_WRITES  4 KiB writes spread over the disk for the fragmented images (default 100000)
  QDEBUG_BENCH_ROUNDS  timed rounds per tool (default 3)
  QDEBUG_BENCH_DIR     keep the images there and reuse them across runs (default: a session temp dir)
  QDEBUG_BENCH_ENFORCE=1  fail when a target (3x map speed-up, 1 s classification) is missed;
                          the 512 MiB peak-memory bound is always enforced
Ratios (qemu time / qdebug time, same run, same image) are printed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
SIZE = os.environ.get("QDEBUG_BENCH_SIZE", "1T")
WRITES = int(os.environ.get("QDEBUG_BENCH_WRITES", "100000"))
CLUSTER = 65536

_REPORT: list[str] = []  # lines printed in the terminal summary


def pytest_collect_file(parent, file_path):
    """Benchmark modules are named bench_*.py (so a plain `pytest` run of tests/ never sees them)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # files named on the command line are collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def report():
    """report(line): print a result now and again in the terminal summary."""
    def add(line: str) -> None:
        _REPORT.append(line)
        print("\n" + line)
    return add


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("qdebug vs QEMU (ratio = QEMU time / qdebug time, same run)")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def bytecode(tmp_path_factory):
    """With QDEBUG_BENCH_BYTECODE=1, qdebug runs with its bytecode cached, as Python runs an
    installed package. Where PYTHONDONTWRITEBYTECODE is set (as in this project's sandboxes),
    every run otherwise compiles qdebug's source again (~65 ms). The cache lives outside the work
    tree and is filled before anything is timed."""
    if os.environ.get("QDEBUG_BENCH_BYTECODE") != "1":
        yield False
        return
    import sys

    mp = pytest.MonkeyPatch()
    mp.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    mp.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("bytecode")))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(root, "qdebug")], check=True)
    yield True
    mp.undo()


def _size_bytes(text: str) -> int:
    from qdebug.trace.syntax import parse_size

    return parse_size(text)


def _spread_writes(size: int, count: int) -> str:
    """qemu-io commands: `count` 4 KiB writes spread evenly over the whole disk, each at a different
    subcluster of its cluster, so every write makes a mixed cluster and its own map extents."""
    clusters = size // CLUSTER
    stride = max(1, clusters // max(count, 1))
    lines = [f"write -q -P 0x5a {(i * stride) * CLUSTER + (i % 16) * 4096} 4k\n"
             for i in range(min(count, clusters))]
    return "".join(lines)


def _build(path: str, *, prealloc: bool, writes: int) -> None:
    opts = "extended_l2=on,cluster_size=64k" + (",preallocation=metadata" if prealloc else "")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, path, SIZE], check=True)
    if writes:
        # one qemu-io process reading every command from stdin; cache=unsafe skips the flushes
        subprocess.run([QEMU_IO, "-t", "unsafe", "-f", "qcow2", path],
                       input=_spread_writes(_size_bytes(SIZE), writes).encode(), check=True,
                       stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def bench_images(tmp_path_factory):
    """name -> path of the benchmark images (built once per session)."""
    if not (QEMU_IMG and QEMU_IO):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but qemu-img/qemu-io are missing")
        pytest.skip("qemu-img/qemu-io not installed")
    where = os.environ.get("QDEBUG_BENCH_DIR") or str(tmp_path_factory.mktemp("bench"))
    os.makedirs(where, exist_ok=True)
    specs = {
        "prealloc": dict(prealloc=True, writes=0),
        "fragmented": dict(prealloc=False, writes=WRITES),
        "prealloc+fragmented": dict(prealloc=True, writes=WRITES),
    }
    images = {}
    for name, spec in specs.items():
        path = os.path.join(where, f"{name.replace('+', '-')}-{SIZE}-{spec['writes']}.qcow2")
        if not os.path.exists(path):
            t = time.perf_counter()
            _build(path + ".tmp", **spec)
            os.rename(path + ".tmp", path)
            print(f"\nbuilt {name} image ({SIZE}, {spec['writes']} writes) in {time.perf_counter() - t:.1f} s")
        images[name] = path
    return images
