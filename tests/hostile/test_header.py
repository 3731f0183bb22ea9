"""Hostile header fields: each refused with one line naming the field or offset, as QEMU's
qcow2_do_open refuses them (checked against `qemu-img info` where QEMU has an opinion)."""

from __future__ import annotations

import os
import struct

import pytest

from tests.hostile.conftest import READ_ONLY, all_ok, one_error, qd
from tests.hostile.images import get_field, patch, put_field
from tests.qemu import create, qemu_img


def qemu_refuses(path) -> bool:
    return qemu_img("info", "-f", "qcow2", path, check=False).returncode != 0


@pytest.mark.parametrize("bits", [0, 8, 22, 31, 1 << 31, (1 << 32) - 1])
def test_cluster_bits_outside_9_to_21(img64, bits):
    put_field(img64, "cluster_bits", bits)
    one_error(img64, "cluster_bits", "offset 20")
    assert qemu_refuses(img64)


def test_l1_size_2_pow_31_is_refused_without_allocating(img64):
    put_field(img64, "l1_size", 1 << 31)
    one_error(img64, "l1_size", "offset 36")
    assert qemu_refuses(img64)


def test_refcount_table_clusters_2_pow_31(img64):
    put_field(img64, "refcount_table_clusters", 1 << 31)
    one_error(img64, "refcount table too large", "offset 56")
    assert qemu_refuses(img64)


def test_refcount_table_clusters_zero(img64):
    put_field(img64, "refcount_table_clusters", 0)
    one_error(img64, "refcount_table_clusters", "offset 56")
    assert qemu_refuses(img64)


@pytest.mark.parametrize("value,needle", [(0x10000 + 8, "exceeds the cluster size"), (96, "below 104"),
                                          ((1 << 32) - 8, "exceeds the cluster size")])
def test_header_length_out_of_bounds(img64, value, needle):
    put_field(img64, "header_length", value)
    one_error(img64, "header_length", needle)
    assert qemu_refuses(img64)


def test_extension_length_past_cluster_0(img64):
    patch(img64, 112 + 4, struct.pack(">I", 0x10000))  # the feature table's length
    line = one_error(img64, "header extension", "0x70", "cluster 0")
    assert "0x6803f857" in line
    assert qemu_refuses(img64)


def test_extension_length_past_the_backing_name(tmp_path, qemu):
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    create(base, "1M")
    create(top, "1M", backing="b.qcow2", backing_fmt="qcow2")
    bfo = get_field(top, "backing_file_offset")
    patch(top, 112 + 4, struct.pack(">I", bfo))  # the backing format extension now covers the name
    one_error(top, "header extension", "backing file name")
    assert qemu_refuses(top)


def test_extensions_may_end_exactly_at_the_backing_name_without_end_marker(tmp_path, qemu):
    """QEMU's loop stops at the backing file name offset: no end marker needed there."""
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    create(base, "1M")
    create(top, "1M", backing="b.qcow2", backing_fmt="qcow2")
    bfo = get_field(top, "backing_file_offset")
    put_field(top, "backing_file_offset", bfo - 8)  # the end marker's place: name moves up
    with open(top, "rb") as f:
        f.seek(bfo)
        name = f.read(get_field(top, "backing_file_size"))
    patch(top, bfo - 8, name)
    assert not qemu_refuses(top)
    all_ok(top)


def test_backing_format_extension_of_16_bytes(tmp_path, qemu):
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    create(base, "1M")
    create(top, "1M", backing="b.qcow2", backing_fmt="qcow2")
    patch(top, 112, struct.pack(">II", 0xE2792ACA, 16) + b"q" * 16)
    one_error(top, "backing format", "0x70")
    assert qemu_refuses(top)


def test_backing_name_of_1023_bytes_is_read_and_reported_short(img64):
    name = "n" * 1023
    put_field(img64, "backing_file_offset", 0x1000)
    put_field(img64, "backing_file_size", 1023)
    patch(img64, 0x1000, name.encode())
    line = one_error(img64, "File name too long", "--no-backing")  # ENAMETOOLONG, as it is
    assert len(line) < 400 and "characters)" in line
    res = qd("info", "--no-backing", "--output=json", img64)
    assert res["rc"] == 0


def test_backing_name_of_1024_bytes(img64):
    put_field(img64, "backing_file_offset", 0x1000)
    put_field(img64, "backing_file_size", 1024)
    one_error(img64, "backing file name too long", "offset 16")
    assert qemu_refuses(img64)


def test_backing_file_offset_past_cluster_0(img64):
    put_field(img64, "backing_file_offset", 0x10001)
    one_error(img64, "backing file offset", "offset 8")
    assert qemu_refuses(img64)


def test_backing_name_ends_at_nul_as_in_qemu(tmp_path, qemu):
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    create(base, "1M")
    create(top, "1M", backing="b.qcow2", backing_fmt="qcow2")
    bfo, bfs = get_field(top, "backing_file_offset"), get_field(top, "backing_file_size")
    patch(top, bfo + bfs, b"\0junk")
    put_field(top, "backing_file_size", bfs + 5)
    all_ok(top)


@pytest.mark.parametrize("version", [0, 1, 4, (1 << 32) - 1])
def test_unsupported_version(img64, version):
    put_field(img64, "version", version)
    one_error(img64, "version", "offset 4")
    assert qemu_refuses(img64)


def test_refcount_order_above_6(img64):
    put_field(img64, "refcount_order", 7)
    one_error(img64, "refcount_order", "offset 96")
    assert qemu_refuses(img64)


def test_unknown_incompatible_bit_is_named_from_the_feature_table(img64):
    put_field(img64, "incompatible_features", get_field(img64, "incompatible_features") | 1 << 40)
    one_error(img64, "unsupported qcow2 feature", "bit 40")
    assert qemu_refuses(img64)


def test_compression_type_and_bit_disagree(img64):
    patch(img64, 104, b"\x01")
    one_error(img64, "compression type", "offset 104")
    assert qemu_refuses(img64)


def test_crypto_extension_without_luks(img64):
    patch(img64, 112, struct.pack(">IIQQ", 0x0537BE77, 16, 0x10000, 0x1000) + struct.pack(">II", 0, 0))
    one_error(img64, "encryption", "0x70")
    assert qemu_refuses(img64)


def test_bitmaps_extension_with_bad_length(img64):
    patch(img64, 112, struct.pack(">II", 0x23852875, 8) + bytes(8) + struct.pack(">II", 0, 0))
    one_error(img64, "bitmaps", "0x70", "length 8")
    assert qemu_refuses(img64)


def test_raw_external_data_bit_without_data_file_is_refused_as_in_qemu_7_2(img64):
    """qemu-img info shows such an image; map, check and reads refuse it ("data-file-raw
    requires a data file"), and so does qdebug (info exit 0, the others one line, exit 1)."""
    put_field(img64, "autoclear_features", 2)
    assert not qemu_refuses(img64)
    for cmd in ("map", "check"):
        q = qemu_img(cmd, "-f", "qcow2", img64, check=False)
        assert q.returncode == 1 and b"data-file-raw requires a data file" in q.stderr
    assert qd("info", img64)["rc"] == 0
    assert "data-file-raw requires a data file" in one_error(img64, commands=[c for c in READ_ONLY if c[0] != "info"])


@pytest.mark.parametrize("cut", [0, 3, 4, 71, 72, 103, 111, 200, 0x10000, 0x30004, 0x40000 + 100])
def test_truncated_file(img64, cut):
    os.truncate(img64, cut)
    for cmd in (["info"], ["map", "--output=json"], ["read", "-o", os.devnull]):
        args = [*cmd, img64] + (["0", "4M"] if cmd[0] == "read" else [])
        res = qd(*args)
        line = res["stderr"].strip().splitlines()[-1]
        assert any(w in line for w in ("empty", "magic", "truncated", "past the end", "header")), line
        # info still describes what it can, with a warning; map and read refuse
        assert res["rc"] == (0 if "warning" in line else 1), res


def test_not_a_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for target, needle in ((tmp_path / "missing", "no such file"), (tmp_path, "not a regular file"),
                           (tmp_path / "fifo", "not a regular file")):
        assert needle in one_error(str(target), commands=[["info"]])
