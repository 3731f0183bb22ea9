"""Hostile L1 / L2 / refcount table offsets: past EOF, unaligned, into the header, or aliasing
other metadata. Either the same guest bytes as QEMU, or one error line naming the table and index."""

from __future__ import annotations

import struct

import pytest

from tests.hostile.conftest import all_ok, error_line, file_size, one_error, qd
from tests.hostile.images import layout_of, patch, put_field, put_u64
from tests.qemu import qemu_img


def read_all(img: str, tmp_path) -> dict:
    out = tmp_path / "qdebug.raw"
    return qd("read", img, "0", "4M", "-o", out), out


def same_as_qemu(img: str, tmp_path) -> None:
    """qdebug's guest bytes equal qemu-img convert's, or both refuse."""
    res, out = read_all(img, tmp_path)
    theirs = tmp_path / "qemu.raw"
    q = qemu_img("convert", "-f", "qcow2", "-O", "raw", img, str(theirs), check=False)
    if q.returncode == 0:
        assert res["rc"] == 0, f"QEMU reads it, qdebug says {res['stderr']}"
        assert out.read_bytes() == theirs.read_bytes()
    else:
        error_line(res)


@pytest.mark.parametrize("where", ["eof", "far", "unaligned", "header"])
def test_l1_table_offset(img64, where):
    lay = layout_of(img64)
    value = {"eof": file_size(img64), "far": 1 << 55, "unaligned": lay.l1_offset + 512, "header": 0}[where]
    put_field(img64, "l1_table_offset", value)
    needle = "not cluster aligned" if where == "unaligned" else "L1 table"
    if where == "header":
        # L1 at offset 0: the header's own bytes read as L1 entries (QEMU does the same); reading
        # through them must end in a clear error or QEMU's bytes.
        for cmd in (["info"], ["map", "--output=json"]):
            qd(*cmd, img64)
        return
    one_error(img64, needle, "offset 40" if where == "unaligned" else "0x")


@pytest.mark.parametrize("value,needle", [(1 << 40, "past the end"), (0x40000 + 512, "not cluster aligned"),
                                          ((1 << 56) - 0x10000, "past the end")])
def test_l2_offset_broken_names_the_l1_index(img64, value, needle):
    lay = layout_of(img64)
    put_u64(img64, lay.l1_offset, value | 1 << 63)
    for cmd in (["map", "--output=json"], ["map", "--subclusters"], ["read", "-o", "/dev/null"]):
        args = [*cmd, img64] + (["0", "64k"] if cmd[0] == "read" else [])
        line = error_line(qd(*args))
        assert "L1 index 0" in line and needle in line, line
    res = qd("info", img64)  # info still describes the image, with a warning or the error
    assert res["rc"] in (0, 1)


def test_l2_table_is_the_l1_table(img64, tmp_path):
    lay = layout_of(img64)
    put_u64(img64, lay.l1_offset, lay.l1_offset | 1 << 63)
    all_ok(img64)
    same_as_qemu(img64, tmp_path)


def test_l2_table_is_a_refcount_block(img64, tmp_path):
    lay = layout_of(img64)
    put_u64(img64, lay.l1_offset, lay.refblocks[0])
    # 16-bit refcounts 1,1,1,1 read as an extended L2 entry: offset set, alloc+zero bits -> INVALID
    assert qd("info", img64)["rc"] == 0
    assert "invalid cluster entry" in error_line(qd("map", "--output=json", img64))
    assert qemu_img("map", "-f", "qcow2", img64, check=False).returncode != 0  # QEMU: EIO too
    same_as_qemu(img64, tmp_path)


def test_l2_table_is_the_header(img64, tmp_path):
    lay = layout_of(img64)
    put_u64(img64, lay.l1_offset, 0)  # 0 means "no table": everything unallocated
    all_ok(img64)
    same_as_qemu(img64, tmp_path)


@pytest.mark.parametrize("entry", [1 << 40, 0x50000 + 100, 0x10000, 0])
def test_data_cluster_offsets(img64, tmp_path, entry):
    """An L2 entry pointing past EOF, unaligned, at the refcount table, or offset 0 with bits set."""
    lay = layout_of(img64)
    l2 = lay.l2_offsets[0]
    patch(img64, l2, struct.pack(">QQ", entry | 1 << 63, 0xFFFFFFFF))
    for cmd in (["info"], ["map", "--output=json"], ["map", "--subclusters"]):
        qd(*cmd, img64)
    same_as_qemu(img64, tmp_path)


def test_invalid_bitmap_read_names_the_l2_entry(img64):
    lay = layout_of(img64)
    patch(img64, lay.l2_offsets[0] + 8, struct.pack(">Q", 0x1_0000_0001))  # sc0 alloc + zero
    line = error_line(qd("read", img64, "0", "4k"))
    assert "L2 offset: 0x40000" in line and "L2 index: 0x0" in line, line
    line = error_line(qd("map", "--output=json", img64))
    assert "L2 index: 0x0" in line
    assert qd("map", "--subclusters", img64)["rc"] == 0  # the bitmap view shows it ('!')


@pytest.mark.parametrize("value", [1 << 40, 0x20000 + 8, 0x30000, 0])
def test_refcount_table_entries(img64, value):
    """Reads do not need refcounts: every read-only command still answers."""
    lay = layout_of(img64)
    put_u64(img64, lay.reftable_offset, value)
    all_ok(img64)


def test_refcount_table_offset_past_eof(img64):
    put_field(img64, "refcount_table_offset", 1 << 40)
    one_error(img64, "refcount table", "past the end")


def test_snapshot_table_garbage(img64):
    put_field(img64, "nb_snapshots", 0xFFFFFFFF)
    line = error_line(qd("info", img64))
    assert "nb_snapshots" in line and "offset 60" in line
    qd("map", "--output=json", img64)


@pytest.mark.parametrize("what", ["invalid-bitmap", "l1-reserved", "unaligned-data", "refcount-zero", "l2-past-eof"])
def test_check_is_not_clean_where_qemu_finds_corruption(img64, what):
    lay = layout_of(img64)
    l2 = lay.l2_offsets[0]
    if what == "invalid-bitmap":
        patch(img64, l2 + 8, struct.pack(">Q", 0x1_0000_0001))
    elif what == "l1-reserved":
        put_u64(img64, lay.l1_offset, l2 | 1 << 63 | 1 << 60)
    elif what == "unaligned-data":
        patch(img64, l2, struct.pack(">QQ", 1 << 63 | 0x50000 + 512, 0xFFFFFFFF))
    elif what == "refcount-zero":
        patch(img64, lay.refblocks[0] + 2 * (l2 >> 16), b"\0\0")
    else:
        put_u64(img64, lay.l1_offset, 1 << 63 | 1 << 40)
    q = qemu_img("check", "-f", "qcow2", img64, check=False)
    assert q.returncode == 2, q.stdout
    res = qd("check", img64)
    assert res["rc"] in (1, 2), res["stderr"]
