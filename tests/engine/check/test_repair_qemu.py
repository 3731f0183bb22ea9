"""Repair against QEMU: after `repair_image`, `qemu-img check` is clean (also for the subcluster
cases QEMU leaves broken), the guest reads exactly what the uncorrupted image read outside the
ranges the plan said would change, and the journal's undo restores the corrupt file byte for byte."""

from __future__ import annotations

import os
import shutil

import pytest

from qdebug.engine.check.checker import check_image
from qdebug.engine.check.repair import plan_repair, repair_image
from qdebug.engine.file.chain import open_chain
from qdebug.engine.file.journal import undo
from qdebug.engine.read.guest import read_guest
from tests.engine.corruptions import SHAPES, corrupt, make_shape
from tests.qemu import convert_raw, qemu_check, qemu_img, qemu_io

pytestmark = pytest.mark.qemu

# The guest view is unchanged by these corruptions (apart from EIO): repair must give it back.
PRESERVING = ("both_bits", "both_bits_zero_sc", "alloc_bits_unallocated", "compressed_bitmap", "refcount_up",
              "refcount_down", "leak_free_cluster", "copied_cleared", "copied_l1_cleared", "l2_reserved_bits",
              "l1_reserved_bits", "prealloc_unaligned", "reftable_reserved", "refblock_unaligned", "refblock_dropped",
              "refblock_outside", "corrupt_bit", "dirty_bit")
# These lose or misplace guest data: qdebug says what it cannot repair and touches nothing of it.
UNSUPPORTED = ("data_unaligned", "l2_table_unaligned", "data_past_eof", "truncate_tail")
# Every shape with QDEBUG_CHECK_ALL_SHAPES=1 (make fuzz / deep runs); a representative set otherwise.
REPAIR_SHAPES = sorted(SHAPES) if os.environ.get("QDEBUG_CHECK_ALL_SHAPES") else [
    "ext64k", "ext16k", "std64k", "ext64k-rc2", "ext32k-snap", "ext64k-backing", "std64k-rc1"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tests.qemu import require_qemu

    require_qemu()
    d = tmp_path_factory.mktemp("shapes")
    return {name: make_shape(d, name) for name in REPAIR_SHAPES}


def _outside(a: bytes, b: bytes, ranges) -> bool:
    """a == b everywhere except in `ranges` [(start, length)]."""
    a, b = bytearray(a), bytearray(b)
    for s, n in ranges:
        a[s:s + n] = bytes(len(a[s:s + n]))
        b[s:s + n] = bytes(len(b[s:s + n]))
    return a == b


def _repair(path, **kw):
    with open_chain(path, writable=True) as chain:
        return repair_image(chain, **kw)


@pytest.mark.parametrize("name", PRESERVING)
@pytest.mark.parametrize("shape", REPAIR_SHAPES)
def test_repair_is_clean_and_keeps_guest_data(shapes, shape, name, tmp_path):
    base = shapes[shape]
    path = str(tmp_path / "img.qcow2")
    shutil.copy(base, path)
    if corrupt(path, name) is None:
        pytest.skip(f"{shape} has nothing to corrupt with {name}")
    with open(path, "rb") as f:
        corrupt_bytes = f.read()
    plan, before, after = _repair(path)
    assert before.exit_code != 0 or name in ("corrupt_bit", "dirty_bit")
    assert not plan.unsupported
    rc, theirs = qemu_check(path)
    assert rc == 0, theirs
    assert after.exit_code == 0
    info = qemu_img("info", "--output=json", path).stdout.decode()
    assert '"corrupt": true' not in info
    # Only where the corruption invented state (a free subcluster marked allocated, a dropped offset)
    # may the guest read differently, and only in the ranges the plan announced; elsewhere: identical.
    changed = [(c.start, c.length) for it in plan.items for c in it.changes]
    if name not in ("both_bits_zero_sc", "prealloc_unaligned"):
        changed = []
    assert _outside(convert_raw(base, str(tmp_path / "a.raw")), convert_raw(path, str(tmp_path / "b.raw")), changed)
    assert undo(path).undone == 1
    with open(path, "rb") as f:
        assert f.read() == corrupt_bytes


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unrepairable_is_reported_not_touched(shapes, name, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, name)
    plan, before, after = _repair(path)
    assert plan.unsupported
    assert after is None or after.exit_code != 0
    rc, theirs = qemu_check(path)
    final = after or before  # nothing else to do: nothing written
    assert rc == 2 and theirs["corruptions"] == final.corruptions


def test_l2_duplicate_keeps_both_readings(shapes, tmp_path):
    """Two entries share a cluster: refcount 2 and no COPIED, both guests read the shared data."""
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, "l2_duplicate")
    seen = convert_raw(path, str(tmp_path / "a.raw"))
    _plan, _before, after = _repair(path)
    assert after.exit_code == 0 and qemu_check(path)[0] == 0
    assert convert_raw(path, str(tmp_path / "b.raw")) == seen


@pytest.mark.parametrize("policy,expect", [("keep-data", "data"), ("zero", "zero"), ("unallocate", "backing")])
def test_policies_on_both_bits(shapes, tmp_path, policy, expect):
    """An unwritten subcluster of a partly written cluster gets both bits; each policy reads as it says."""
    base = shapes["ext64k-backing"]
    path = str(tmp_path / "img.qcow2")
    shutil.copy(base, path)
    corrupt(path, "both_bits_zero_sc")
    with open_chain(path) as chain:
        plan = plan_repair(chain, check_image(chain.top), policy=policy)
    (item,) = [it for it in plan.items if it.finding is not None]
    (change,) = item.changes
    assert change.before.startswith("EIO") and "as data" in change.before and "as zero" in change.before
    plan2, _b, after = _repair(path, policy=policy)
    assert plan2.to_json() == plan.to_json()
    assert after.exit_code == 0 and qemu_check(path)[0] == 0
    with open_chain(path) as chain:
        got = read_guest(chain, change.start, change.length)
    if expect == "zero":
        assert got == bytes(change.length)
    elif expect == "backing":
        assert got == b"\xee" * change.length
    else:
        with open(path, "rb") as f:
            host = item.finding.host_offset + (change.start - item.finding.guest_offset)
            f.seek(host)
            assert got == f.read(change.length)
    assert change.after.startswith(got[:16].hex(" "))
    # everything else reads as before the corruption
    assert _outside(convert_raw(base, str(tmp_path / "a.raw")), convert_raw(path, str(tmp_path / "b.raw")),
                    [(change.start, change.length)])


def test_compressed_bitmap_data_is_never_freed(shapes, tmp_path):
    """qemu-img check -r leaks frees the compressed cluster as a "leak": once its host cluster is
    reused the guest data is gone. After qdebug's repair the same writes leave it intact."""
    base = shapes["ext64k"]
    cs = 65536
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    shutil.copy(base, ours)
    corrupt(ours, "compressed_bitmap")  # guest cluster 8 (0x15), packed with cluster 9 (0x16)
    shutil.copy(ours, theirs)
    qemu_img("check", "-r", "leaks", theirs, check=False)
    _repair(ours)
    assert qemu_check(ours)[0] == 0
    later = (f"write -P 0x77 {9 * cs} {cs}", f"write -P 0x66 {15 * cs} {cs}")  # frees, then reuses
    qemu_io(theirs, *later)
    qemu_io(ours, *later)
    lost = qemu_io(theirs, f"read -P 0x15 {8 * cs} {cs}", check=False)
    assert b"Pattern verification failed" in lost.stdout or lost.returncode != 0 or b"error" in lost.stdout
    kept = qemu_io(ours, f"read -P 0x15 {8 * cs} {cs}", check=False)
    assert b"Pattern verification failed" not in kept.stdout and kept.returncode == 0
    assert qemu_check(ours)[0] == 0


def test_entry_filter_repairs_only_that_entry(shapes, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, "both_bits")
    corrupt(path, "alloc_bits_unallocated")
    with open_chain(path) as chain:
        report = check_image(chain.top)
    target = next(f for f in report.findings if f.kind == "invalid-bitmap-unallocated")
    plan, _b, after = _repair(path, entries=[(target.l1_index, target.l2_index)])
    fixed = [it.finding for it in plan.items if it.finding is not None]
    assert [(f.l1_index, f.l2_index) for f in fixed] == [(target.l1_index, target.l2_index)]
    assert [f.kind for f in after.findings if f.severity == "error"] == ["invalid-bitmap-allocated"]
    assert not plan.clear_corrupt
