"""Host layout against an independent decoder (tests/engine/forensics/decoder.py) and against
`qemu-img check`'s leak and reference findings, on every image shape of the corruption
generator, healthy and with each corruption."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from qdebug.engine.forensics.layout import KIND_NAMES, PROBLEM_NAMES, host_layout
from tests.engine.corruptions import CORRUPTIONS, SHAPES, corrupt, make_shape
from tests.engine.forensics.decoder import decode
from tests.qemu import QEMU_IMG, create, qemu_img, qemu_io

pytestmark = pytest.mark.qemu

# Corruptions where qemu-img check counts references differently from the layout, on purpose:
# QEMU counts an unaligned reference at offset >> cluster_bits (the layout claims nothing: the
# reference does not say where its cluster is), does not count a compressed cluster whose bitmap
# is not zero (the layout still maps its bytes: they are its data), and walks the header as the
# L2 table of an L1 entry that has flags but no offset (the layout sees no table there), and does
# not count a refcount block whose table entry has reserved bits (the layout maps the block).
QEMU_COUNTS_DIFFERENTLY = {"data_unaligned", "prealloc_unaligned", "l2_table_unaligned", "compressed_bitmap",
                           "l1_only_flags", "reftable_reserved"}
REFCOUNT_EDITS = {"refcount_up", "refcount_down", "leak_free_cluster", "refblock_dropped", "refblock_unaligned",
                  "refblock_outside", "reftable_reserved"}


def _compare_decoder(path: str) -> None:
    lay = host_layout(path)
    want = decode(path)
    kinds = lay.cluster_kinds()
    got = {c: KIND_NAMES[int(k)] for c, k in enumerate(kinds.tolist())}
    assert got == want["kinds"], {c: (got[c], want["kinds"][c]) for c in got if got[c] != want["kinds"].get(c)}
    mine = sorted((PROBLEM_NAMES[int(p)], int(o)) for p, o in zip(lay.problems.problem, lay.problems.offset)
                  if p != 0)
    assert mine == want["problems"]
    # the runs cover the file exactly, and the owners answered per cluster agree with the runs
    assert int(lay.runs.count.sum()) == lay.nb_clusters
    for c in range(lay.nb_clusters):
        owners = lay.owners(c)
        if got[c] in ("free", "leaked"):
            assert owners == ()
        else:
            assert owners and all(o.kind in (got[c], "data", "l2", "l1", "compressed", "refcount-block", "header",
                                             "refcount-table", "snapshot-table", "bitmap-directory",
                                             "bitmap-table", "bitmap-data") for o in owners)


def _qemu_findings(path: str) -> tuple[set[int], set[int]] | None:
    """None where QEMU refuses the image, else (clusters qemu-img check calls leaked with no reference, clusters it counts referenced twice
    or more with a lower refcount)."""
    p = subprocess.run([QEMU_IMG, "check", path], capture_output=True, text=True)
    text = p.stdout + p.stderr
    if "Could not open" in text:
        return None
    leaked = {int(m.group(1)) for m in re.finditer(r"Leaked cluster (\d+) refcount=\d+ reference=0", text)}
    multi = {int(m.group(1)) for m in re.finditer(r"ERROR cluster (\d+) refcount=(\d+) reference=(\d+)", text)
             if int(m.group(3)) >= 2}
    return leaked, multi


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_layout_healthy_shapes(qemu, tmp_path, shape):
    path = make_shape(tmp_path, shape)
    _compare_decoder(path)
    lay = host_layout(path)
    s = lay.summary()
    assert not s.problems and "leaked" not in s.bytes_by_kind and "overlap" not in s.bytes_by_kind
    assert s.image_end_offset == int(qemu_check_end(path))


def qemu_check_end(path: str) -> int:
    out = qemu_img("check", "--output=json", path, check=False).stdout
    import json

    return json.loads(out).get("image-end-offset", 0)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("shape", ["ext64k", "ext32k-snap", "std4k-rc8", "ext64k-bitmaps"])
def test_layout_corruptions(qemu, tmp_path, shape, name):
    path = make_shape(tmp_path, shape)
    if corrupt(path, name) is None:
        pytest.skip(f"{shape} has nothing to corrupt with {name}")
    _compare_decoder(path)
    if name in QEMU_COUNTS_DIFFERENTLY:
        return
    lay = host_layout(path)
    kinds = lay.cluster_kinds()
    found = _qemu_findings(path)
    if found is None:
        return
    leaked, multi = found
    if lay.refcounts_known and name not in ("refblock_outside",):
        assert set(np.flatnonzero(kinds == 12).tolist()) == leaked
    if name not in REFCOUNT_EDITS:
        assert set(np.flatnonzero(kinds == 13).tolist()) == multi


def test_overlap_l2_table_used_as_data(qemu, tmp_path):
    """An L2 entry pointing at the L2 table itself: the overlap names both owners, and qemu-img
    check counts two references there."""
    path = create(str(tmp_path / "o.qcow2"), "4M")
    qemu_io(path, "write -P 0x11 0 128k")
    with open(path, "r+b") as f:  # L2 at 0x40000; entry 1 -> the L2 table's own cluster
        f.seek(0x40000 + 16)
        f.write((0x8000000000040000).to_bytes(8, "big"))
    lay = host_layout(path)
    assert lay.kind_of(4) == "overlap"
    assert {o.describe() for o in lay.owners(4)} == {"L2 table of L1 index 0", "data of guest 0x10000"}
    assert 4 in _qemu_findings(path)[1]
    assert lay.kind_of(6) == "leaked" and lay.guess_of(6) == "data"  # guest 1's old cluster


def test_guesses_of_orphans(qemu, tmp_path):
    """An L1 entry zeroed: the orphaned L2 table is guessed an L2 table, its data guest data."""
    path = create(str(tmp_path / "g.qcow2"), "4M", cluster_size="16k")
    qemu_io(path, "write -P 0x11 0 64k", "write -z 64k 16k")
    with open(path, "r+b") as f:
        f.seek(0xC000)  # the L1 table (16k clusters: header, reftable, refblock, L1)
        f.write(bytes(8))
    lay = host_layout(path)
    assert lay.kind_of(4) == "leaked" and lay.guess_of(4) == "l2-table"
    assert {lay.guess_of(c) for c in range(5, 9)} == {"data"}
    assert lay.summary().bytes_by_guess == {"l2-table": 16384, "data": 65536}


def test_json_is_complete(qemu, tmp_path):
    import json

    path = make_shape(tmp_path, "ext32k-snap")
    lay = host_layout(path)
    doc = json.loads("".join(lay.iter_json()))
    assert doc["cluster-size"] == 32768 and doc["file-size"] == lay.file_size
    starts = [r["start"] for r in doc["runs"]]
    ends = [r["start"] + r["length"] for r in doc["runs"]]
    assert starts[0] == 0 and starts[1:] == ends[:-1] and ends[-1] == lay.nb_clusters * 32768
    assert any(r.get("snapshot") == "1" for r in doc["runs"])
