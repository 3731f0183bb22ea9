"""Salvage on the damage corpus (corpus.py): every byte reported recovered or zero equals the guest's
data before the damage, lost bytes stay within what the damage may have destroyed, the report
covers the disk without gaps, and qemu-img convert is run on the same damaged image (where it
fails or silently returns wrong data is recorded by `python -m tests.engine.forensics.corpus`)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from qdebug.engine.forensics.salvage_run import salvage
from tests.engine.forensics import corpus

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tests.qemu import require_qemu

    require_qemu()
    out = {}
    for shape in corpus.SHAPES:
        d = tmp_path_factory.mktemp(shape)
        path = corpus.make(str(d), shape)
        out[shape] = (str(d), corpus.truth(path, str(d / "truth.raw")))
    return out


def _copy_dir(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return os.path.join(dst, "disk.qcow2")


def check_salvage(path: str, want: bytes, allowed: list[tuple[int, int]], tmp) -> dict:
    out = str(tmp / "out.raw")
    res = salvage(path, out)
    rep = res.to_json()
    got = open(out, "rb").read()
    assert len(got) == len(want) == rep["virtual-size"]
    pos = 0
    allow = np.zeros(len(want), dtype=bool)
    for a, b in allowed:
        allow[a:b] = True
    g, w = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
    for r in rep["ranges"]:
        s, n = r["start"], r["length"]
        assert s == pos and n > 0, "ranges must cover the disk in order, without gaps or overlaps"
        pos += n
        if r["status"] in ("recovered", "zero"):
            bad = np.flatnonzero(g[s:s + n] != w[s:s + n])
            assert not len(bad), f"{r} reports guest bytes that are not the guest's (first at 0x{s + bad[0]:x})"
        else:
            assert not g[s:s + n].any(), "lost ranges are zeros in the output"
            outside = np.flatnonzero(~allow[s:s + n])
            assert not len(outside), f"lost {r} beyond what the damage destroyed (0x{s + outside[0]:x})"
    assert pos == len(want)
    assert res.exit_code == (1 if rep["summary"]["lost"] or res.evidence else 0)
    return rep


def test_healthy_images_salvage_whole(built, tmp_path):
    for shape, (d, want) in built.items():
        path = _copy_dir(d, str(tmp_path / shape))
        rep = check_salvage(path, want, [], tmp_path)
        assert rep["summary"]["lost"] == 0 and rep["summary"]["orphaned-data-clusters"] == 0, shape


@pytest.mark.parametrize("name", sorted(corpus.DAMAGES))
@pytest.mark.parametrize("shape", sorted(corpus.SHAPES))
def test_damage(built, tmp_path, shape, name):
    d, want = built[shape]
    path = _copy_dir(d, str(tmp_path / "img"))
    allowed = corpus.damage(path, name)
    if allowed is None:
        pytest.skip(f"{shape}: nothing to damage with {name}")
    before = open(path, "rb").read()
    check_salvage(path, want, allowed, tmp_path)
    assert open(path, "rb").read() == before, "salvage never writes the image"


def test_a_single_zeroed_entry_is_reported_as_orphaned_data(qemu, tmp_path):
    """The documented limit: one L2 entry set to zero leaves no trace but its leaked cluster. The
    range reads as unallocated (the metadata says so), but the cluster counts as orphaned guest
    data, the exit code is 1 and --orphans keeps it."""
    from tests.qemu import create, qemu_io

    path = create(str(tmp_path / "z.qcow2"), "1M")
    qemu_io(path, "write -q -P 0x11 0 64k", "write -q -P 0x22 64k 64k")
    with open(path, "r+b") as f:
        f.seek(0x40010)
        f.write(bytes(16))
    res = salvage(path, str(tmp_path / "o.raw"), orphans_dir=str(tmp_path / "orph"))
    assert res.evidence == 1 and res.exit_code == 1
    assert [(o["host-offset"], o["guess"]) for o in res.orphans] == [(0x60000, "data")]
    assert open(tmp_path / "orph" / "0x60000-data.bin", "rb").read() == b"\x22" * 65536
