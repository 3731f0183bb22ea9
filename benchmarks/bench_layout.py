"""`qdebug layout` vs `qemu-img check` on the 1 TiB benchmark images (same run, same image).

Both walk every L2 table and every refcount block; layout also claims every host cluster for its
owner and cuts the result into runs. Target (issue #13): the preallocated image (16.8M data
clusters, 4096 L2 tables) classified in at most the time `qemu-img check` takes, under 512 MiB
peak RSS (always enforced). The layout's own numbers must agree with check's: the data clusters
it finds are check's allocated clusters, its image end offset is check's.
"""

from __future__ import annotations

import json

import pytest
from bench_read import ENFORCE, QDEBUG, QEMU_IMG, compare


@pytest.mark.parametrize("name", ["prealloc", "fragmented"])
def test_layout(benchmark, report, bench_images, bytecode, tmp_path, name):
    img = bench_images[name]
    ratio = compare(benchmark, report, f"layout --output=json vs check, {name}",
                    QDEBUG + ["layout", "--output=json", img], [QEMU_IMG, "check", "--output=json", img], tmp_path,
                    same_output=False)
    with open(tmp_path / "ours.out") as f:
        ours = json.load(f)
    with open(tmp_path / "theirs.out") as f:
        theirs = json.load(f)
    assert ours["summary"]["data-clusters"] == theirs["allocated-clusters"]
    assert ours["summary"]["image-end-offset"] == theirs["image-end-offset"]
    assert not ours["problems"]
    if ENFORCE and name == "prealloc":
        assert ratio >= 1, f"layout on {name}: slower than qemu-img check ({ratio:.2f}x)"
