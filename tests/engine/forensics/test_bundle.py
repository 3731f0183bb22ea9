"""`bundle`: check, map, layout and info find on the metadata-only copy what they find on the
original (healthy and corrupted images of every shape), none of the guest's data is left in it,
and the bundle says what it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qdebug.engine.forensics.bundle import bundle_info, make_bundle
from qdebug.engine.forensics.layout import HostKind, host_layout
from qdebug.engine.forensics.source import ImageFile
from tests.engine.corruptions import corrupt, make_shape

pytestmark = pytest.mark.qemu


def qd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdebug.cli", *map(str, args)], capture_output=True, text=True)


def _same_findings(orig: str, bun: str) -> None:
    def norm(text: str, name: str) -> str:
        return text.replace(name, "IMAGE").replace(os.path.basename(name), "IMAGE")

    for cmd in (["check", "--output=json"], ["check"], ["layout", "--output=json"],
                ["map", "--output=json", "--no-backing"], ["map", "--subclusters", "--output=json"]):
        a, b = qd(*cmd, orig), qd(*cmd, bun)
        assert a.returncode == b.returncode, (cmd, a.stderr, b.stderr)
        assert norm(a.stdout + a.stderr, orig) == norm(b.stdout + b.stderr, bun), cmd
    ia = json.loads(qd("info", "--output=json", "--no-backing", orig).stdout or "{}")
    ib = json.loads(qd("info", "--output=json", "--no-backing", bun).stdout or "{}")
    if ia:
        assert ib["qdebug"].pop("bundle")["source"] == os.path.basename(orig)
        for d in (ia, ib):
            d.pop("filename"), d.pop("actual-size")
            d["qdebug"]["extensions"] = [e for e in d["qdebug"]["extensions"] if e["name"] != "qdebug bundle"]
            d["qdebug"]["warnings"] = [w.replace(orig, "IMAGE").replace(bun, "IMAGE") for w in d["qdebug"]["warnings"]]
            d["qdebug"].get("backing-chain", [{}])[0].pop("filename", None)
        assert ia == ib


def _no_guest_data(orig: str, bun: str) -> None:
    lay = host_layout(orig)
    cs = lay.cluster_size
    with ImageFile.open(bun) as f:
        for i in np.flatnonzero(np.isin(lay.runs.kind, (HostKind.DATA, HostKind.COMPRESSED))).tolist():
            a, n = int(lay.runs.start[i]) * cs, int(lay.runs.count[i]) * cs
            assert not any(f.pread(a, n)), f"guest data left at 0x{a:x}"
    assert os.path.getsize(orig) == os.path.getsize(bun)


CASES = [(s, c) for s in ("ext64k", "ext32k-snap", "std4k-rc8")
         for c in (None, "l2_duplicate", "data_past_eof", "leak_free_cluster", "truncate_tail", "both_bits")]
CASES += [("ext64k-bitmaps", None), ("ext64k-zstd", None), ("ext64k", "refblock_dropped")]


@pytest.mark.parametrize("shape,corruption", CASES)
def test_bundle_keeps_every_finding(qemu, tmp_path, shape, corruption):
    orig = make_shape(tmp_path, shape)
    if corruption and corrupt(orig, corruption) is None:
        pytest.skip("not applicable")
    bun = str(tmp_path / "out" / "bundle.qcow2")
    os.makedirs(os.path.dirname(bun))
    res = make_bundle(orig, bun)
    assert res.marker == "header extension"
    with ImageFile.open(bun) as f:
        assert bundle_info(f.header)["removed"]["data-clusters"] == res.removed_data_clusters
    _same_findings(orig, bun)
    _no_guest_data(orig, bun)


def test_orphaned_l2_table_is_kept_and_leaked_data_marked(qemu, tmp_path):
    from tests.qemu import create, qemu_io

    path = create(str(tmp_path / "g.qcow2"), "4M", cluster_size="16k")
    qemu_io(path, "write -P 0x11 0 64k")
    with open(path, "r+b") as f:
        f.seek(0xC000)
        f.write(bytes(8))  # the L1 entry: its L2 table (cluster 4) and data (5-8) are leaked
    bun = str(tmp_path / "b.qcow2")
    res = make_bundle(path, bun)
    assert res.kept_unreferenced_clusters == 1 and res.removed_unreferenced_clusters == 4
    with open(path, "rb") as a, open(bun, "rb") as b:
        a.seek(0x10000), b.seek(0x10000)
        assert a.read(16384) == b.read(16384)  # the orphaned L2 table, byte for byte
        b.seek(0x14000)
        assert b"guest data removed" in b.read(512) and b"\x11" not in b.read(65536)
    _same_findings(path, bun)


def test_bundle_without_room_in_cluster_0_writes_a_side_file(qemu, tmp_path):
    from tests.qemu import create

    base = tmp_path / ("b" * 200 + ".raw")  # a long backing name fills the 512-byte cluster 0
    base.write_bytes(bytes(1 << 20))
    path = create(str(tmp_path / "s.qcow2"), "1M", cluster_size="512", extended_l2=False,
                  backing=str(base), backing_fmt="raw")
    res = make_bundle(path, str(tmp_path / "sb.qcow2"))
    assert res.marker.endswith("sb.qcow2.qdebug-bundle.json")
    assert json.load(open(res.marker))["source"] == "s.qcow2"
    r = qd("bundle", path, "-o", path)
    assert r.returncode == 1 and "refusing" in r.stderr


def test_map_on_a_bundle_of_an_image_with_holes_in_its_data_clusters(qemu, tmp_path):
    """Small images with partly written clusters look metadata-preallocated to QEMU, whose map then
    reports the holes of data clusters as zeros: the bundle remembers those holes."""
    from tests.qemu import create, qemu_img, qemu_io

    path = create(str(tmp_path / "h.qcow2"), "8M", cluster_size="2M")  # 64 KiB subclusters: a 1 KiB write
    qemu_io(path, "write -q -P 1 0 1k", "write -q -P 2 100k 1k", "write -q -P 3 3M 16k", "write -q -P 4 5M 41k")
    bun = str(tmp_path / "b.qcow2")
    res = make_bundle(path, bun)
    assert res.info["metadata-preallocated"] and res.info["data-holes"]
    theirs = qemu_img("map", "--output=json", path).stdout.decode()
    assert qd("map", "--output=json", bun).stdout == theirs == qd("map", "--output=json", path).stdout
    assert "zero\": true, \"data\": true" in theirs  # the case that needs the holes
    _same_findings(path, bun)
