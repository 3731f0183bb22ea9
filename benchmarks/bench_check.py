"""`qdebug check` vs `qemu-img check` on the 1 TiB benchmark images (same run, same image).

The preallocated image has metadata for all 16M clusters (every L2 table, every refcount in use):
the whole-metadata scan `qemu-img check` is built for. The fragmented one has all 4096 L2 tables
but only 100k entries in use: there most of qdebug's time is Python and numpy starting. The ratio
printed is QEMU time / qdebug time; the counts of both tools must be identical, and qdebug's peak
RSS stays under 128 MiB (a fleet scan runs many checks side by side; qemu-img check needs ~40 MiB).

qdebug runs in the environment as it is. Where PYTHONDONTWRITEBYTECODE is set (as in this
project's sandboxes), every run compiles qdebug's source again, ~65 ms that an installed package
(or a checkout with __pycache__) never pays: QDEBUG_BENCH_BYTECODE=1 measures qdebug as Python
runs it by default, its bytecode cached (the `bytecode` fixture of conftest.py).
"""

from __future__ import annotations

import json

import pytest
from bench_read import ENFORCE, QDEBUG, QEMU_IMG, compare

CHECK_MEMORY_LIMIT_MIB = 128


@pytest.mark.parametrize("name", ["prealloc", "fragmented"])
def test_check(benchmark, report, bench_images, bytecode, tmp_path, name):
    img = bench_images[name]
    ratio = compare(benchmark, report, f"check --output=json, {name}", QDEBUG + ["check", "--output=json", img],
                    [QEMU_IMG, "check", "--output=json", img], tmp_path, same_output=False)
    with open(tmp_path / "ours.out") as f:
        ours = json.load(f)
    with open(tmp_path / "theirs.out") as f:
        theirs = json.load(f)
    ours.pop("findings")
    assert ours == theirs
    assert benchmark.extra_info["peak_rss_mib"] < CHECK_MEMORY_LIMIT_MIB
    if ENFORCE:
        assert ratio >= 1, f"check on {name}: slower than qemu-img check ({ratio:.2f}x)"
