"""Bounded resources: time and memory follow the real metadata, not attacker-chosen numbers.

Commands run in a driver subprocess under RLIMIT_AS = 1 GiB (the images are small files, so their
mmaps fit) with a per-command timeout; a metadata-heavy image is measured by peak RSS instead
(its sparse file is larger than the address-space limit, though little of it is ever resident).
"""

from __future__ import annotations

import os

import pytest

from tests.hostile.driver import spawn
from tests.hostile.images import huge_virtual, put_field
from tests.qemu import create, qemu_img, qemu_io

GiB = 1 << 30


def run_limited(commands, memory_limit=GiB, timeout=30.0):
    records, done = spawn({"commands": commands, "memory_limit": memory_limit, "timeout": timeout},
                          60 + timeout * len(commands))
    for r in records:
        assert not r["problems"], (r["argv"], r["problems"], r["stderr"])
    return records, done


def every_command(img, size):
    n = str(min(size, 1 << 20))
    return [["info", img], ["info", "--output=json", img], ["map", img], ["map", "--output=json", img],
            ["map", "--subclusters", img], ["read", img, "0", n, "-o", os.devnull],
            ["read", img, str(size - 4096), "4096", "-o", os.devnull], ["check", img]]


@pytest.mark.parametrize("cluster_size,extended", [("2M", False), ("64k", True), ("512", False)])
def test_huge_virtual_size_in_a_tiny_file(tmp_path, qemu, cluster_size, extended):
    path = str(tmp_path / "h.qcow2")
    create(path, "4M", cluster_size=cluster_size, extended_l2=extended)
    qemu_io(path, "write -P 1 0 64k")
    size = huge_virtual(path)
    assert os.stat(path).st_size <= 64 << 20 and size >= 1 << 36
    records, done = run_limited(every_command(path, size))
    assert [r["rc"] for r in records[:7]] == [0] * 7
    assert done["maxrss_kib"] < GiB >> 10


def test_huge_backing_chain(tmp_path, qemu):
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    create(base, "4M", cluster_size="2M", extended_l2=False)
    qemu_io(base, "write -P 2 2M 64k")
    create(top, "4M", cluster_size="2M", extended_l2=False, backing="b.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 1 0 64k")
    size = huge_virtual(top)
    huge_virtual(base)
    records, _ = run_limited(every_command(top, size)[:7])
    assert all(r["rc"] == 0 for r in records)


@pytest.mark.parametrize("field,value", [("l1_size", 1 << 31), ("refcount_table_clusters", 1 << 31),
                                         ("nb_snapshots", (1 << 32) - 1), ("size", (1 << 64) - 512)])
def test_attacker_sized_tables_are_refused_fast(img64, field, value):
    put_field(img64, field, value)
    records, done = run_limited(every_command(img64, 4 << 20), timeout=5.0)
    assert all(r["secs"] < 5 for r in records)
    assert done["maxrss_kib"] < 512 << 10


def test_metadata_heavy_image_peak_rss(tmp_path, qemu):
    """64 GiB with every L2 table preallocated (256 tables, 16 MiB of L2, 1M allocated clusters):
    peak RSS stays far below 1 GiB."""
    path = str(tmp_path / "meta.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on,preallocation=metadata",
             path, "64G")
    cmds = [["info", path], ["map", "--output=json", path], ["check", path]]
    records, done = run_limited(cmds, memory_limit=-1, timeout=120.0)
    assert all(r["rc"] == 0 for r in records), records
    assert done["maxrss_kib"] < GiB >> 10
