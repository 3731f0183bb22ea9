"""One named test per crash, hang or blow-up the fuzzer (tests/test_fuzz.py) ever found, rebuilt by
hand so it stays meaningful when the mutator changes. Each docstring names the fuzz case."""

from __future__ import annotations

import struct

from tests.hostile.conftest import error_line, one_error, qd
from tests.hostile.images import get_field, huge_virtual, layout_of, patch, put_field, put_u64
from tests.qemu import create, qemu_io


def test_backing_name_with_nul_byte(tmp_path, qemu):
    """overlay seed 20261308: 'embedded null byte' ValueError from os.path on the backing name."""
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    create(base, "1M")
    create(top, "1M", backing="b.qcow2", backing_fmt="qcow2")
    bfo = get_field(top, "backing_file_offset")
    patch(top, bfo, b"x\0yz")
    put_field(top, "backing_file_size", 4)
    one_error(top, "'" + str(tmp_path / "x") + "'", "not found")


def test_feature_table_read_as_backing_format(img64):
    """rc1 seed 20261210: a 384-byte 'backing format' made a 1300-character error line."""
    patch(img64, 112, struct.pack(">I", 0xE2792ACA))
    put_field(img64, "backing_file_offset", 0x1000)
    put_field(img64, "backing_file_size", 4)
    patch(img64, 0x1000, b"back")
    line = error_line(qd("info", img64))
    assert len(line) < 200 and "backing format" in line


def test_reftable_entry_with_bit_63(img64):
    """std512 seed 20262243 / std64 seed 20262154: offsets with bit 63 became negative int64
    indices in check (IndexError) and repair (bincount ValueError)."""
    lay = layout_of(img64)
    put_u64(img64, lay.reftable_offset + 8, 1 << 63 | 0x20000)
    res = qd("check", img64)
    assert res["rc"] == 2 and "outside image" in res["stderr"]
    assert qd("repair", "--dry-run", img64)["rc"] == 2  # corruptions to repair


def test_repair_when_check_cannot_complete(img64):
    """overlay seed 20261128: nb_snapshots=0xffffffff left references incomplete; repair planned
    negative refcounts (ValueError). Now: one error line, nothing planned."""
    put_field(img64, "nb_snapshots", 0xFFFFFFFF)
    assert qd("check", img64)["rc"] == 1
    line = error_line(qd("repair", "--dry-run", img64))
    assert "nb_snapshots" in line and "nothing is repaired" in line


def test_plan_over_l2_table_past_eof(img64):
    """ext16_zstd seed 20261126: freeing the old L2 table (past EOF, no refcount block) let the
    allocator's internal _Again escape as an internal error."""
    lay = layout_of(img64)
    put_u64(img64, lay.l1_offset, 1 << 32)
    for cmd in ("write -P 0x22 0 4k", "write -z 8k 4k", "discard 0 64k"):
        assert qd("plan", img64, cmd)["rc"] in (0, 1)


def test_map_of_a_2_pow_61_byte_disk(tmp_path, qemu):
    """op_huge_virtual: map walked 2^29 chunks of 4 GiB (a hang); now it jumps over empty space."""
    path = str(tmp_path / "h.qcow2")
    create(path, "4M", cluster_size="2M", extended_l2=False)
    qemu_io(path, "write -P 1 0 64k")
    huge_virtual(path)
    for cmd in (["map", "--output=json"], ["map"], ["map", "--subclusters"], ["info"]):
        res = qd(*cmd, path, timeout=30)
        assert res["rc"] == 0 and res["secs"] < 30
    assert b'"length": 2305843009211596800' in qd("map", "--output=json", path)["stdout_head"]


def test_plan_freeing_a_garbage_offset_stays_small(tmp_path, qemu):
    """overlay seed 20261258: an L2 entry at a garbage host offset (~130 TB) made the planned free
    grow the refcount table to cover it: 4.8 GB of Python lists. QEMU stops with EFBIG (and its
    free path ignores the error, leaking the cluster); so does qdebug, in bounded memory."""
    path = str(tmp_path / "p.qcow2")
    create(path, "1M", cluster_size="16k")
    qemu_io(path, "write -P 1 0 16k")
    lay = layout_of(path)
    put_u64(path, lay.l2_offsets[0], 1 << 63 | 0x7700E0418000)
    from tests.hostile.driver import spawn
    records, done = spawn({"commands": [["plan", path, "write -z 0 16k"], ["plan", path, "discard 0 16k"]],
                           "memory_limit": 1 << 30}, 120)
    assert all(not r["problems"] for r in records), records
    assert done["maxrss_kib"] < 512 << 10


def test_repair_with_the_refcount_table_on_the_l1_table(img64):
    """ext16_zstd seed 20262086: refcount_table_offset pointing at the L1 table, whose COPIED bit
    (63) made a negative block index in repair's rebuild (IndexError)."""
    lay = layout_of(img64)
    put_field(img64, "refcount_table_offset", lay.l1_offset)
    assert qd("check", img64)["rc"] in (1, 2)
    assert qd("repair", "--dry-run", img64)["rc"] in (1, 2)  # 2: work to do


def test_ignored_bitmaps_extension_with_a_huge_directory(img64):
    """qd_zstd seed 20268942: a bitmaps extension without the autoclear bit (QEMU ignores it, so
    its fields are never validated) claimed a 2^63-byte directory; check read it whole (MemoryError)."""
    patch(img64, 112, struct.pack(">IIIIQQ", 0x23852875, 24, 1, 0, 1 << 62, 0x10000) + bytes(8))
    from tests.hostile.driver import spawn
    records, _ = spawn({"commands": [["check", img64], ["repair", "--dry-run", img64], ["info", img64]],
                        "memory_limit": 1 << 30}, 120)
    assert all(not r["problems"] for r in records), records
    assert [r["rc"] for r in records] == [0, 0, 0]  # QEMU ignores the extension: a clean image


def test_repair_plan_never_takes_a_reference_below_zero(tmp_path, qemu):
    """rc1 seed 1954 (QDEBUG_FUZZ_SEED=777): with 1-bit refcounts, a preallocated entry inside the
    refcount table's cluster and a compressed descriptor far past the end overflow the refcounts
    of the table and of its block; rebuilding that block took away a reference the check had not
    counted, and packing the -1 was an internal error (ValueError, exit 70)."""
    from tests.hostile.images import _script

    img = str(tmp_path / "rc1.qcow2")
    create(img, "1M", cluster_size="16k", refcount_bits=1)
    qemu_io(img, *_script(16384, False))
    l2 = layout_of(img).l2_offsets[0]
    put_u64(img, l2 + 16 * 8, 0x41FFFFFFFFFFFFFF)
    put_u64(img, l2 + 16 * 11, 0x4200)
    patch(img, 0xDE9, b"\x8f")
    patch(img, 0xF63, b"\x79")
    res = qd("repair", "--dry-run", img)
    assert res["rc"] in (0, 2, 3) and "internal error" not in res["stderr"], res["stderr"]
