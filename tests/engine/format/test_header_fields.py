"""The header's field table: it parses and packs QEMU's headers byte for byte, and its offsets are
the spec's (qcow2.txt "Header")."""

from __future__ import annotations

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.format.header import FIELD, HEADER_FIELDS, header_dump, pack_header_fields
from tests.qemu import create, qemu_img

SPEC = {  # qcow2.txt: byte ranges of the header fields
    "magic": (0, 3), "version": (4, 7), "backing_file_offset": (8, 15), "backing_file_size": (16, 19),
    "cluster_bits": (20, 23), "size": (24, 31), "crypt_method": (32, 35), "l1_size": (36, 39),
    "l1_table_offset": (40, 47), "refcount_table_offset": (48, 55), "refcount_table_clusters": (56, 59),
    "nb_snapshots": (60, 63), "snapshots_offset": (64, 71), "incompatible_features": (72, 79),
    "compatible_features": (80, 87), "autoclear_features": (88, 95), "refcount_order": (96, 99),
    "header_length": (100, 103), "compression_type": (104, 104)}


def test_offsets_are_the_specs_and_the_table_has_no_gaps():
    assert {f.name: (f.offset, f.offset + f.width - 1) for f in HEADER_FIELDS} == SPEC
    for a, b in zip(HEADER_FIELDS, HEADER_FIELDS[1:]):
        assert a.offset + a.width == b.offset


@pytest.mark.parametrize("opts", [dict(compat="0.10", extended_l2=False), dict(), dict(compression_type="zstd", extended_l2=False),
                                  dict(cluster_size="2M", refcount_bits=64)])
def test_pack_gives_back_qemus_bytes(qemu, tmp_path, opts):
    path = create(str(tmp_path / "a.qcow2"), "1G", **opts)
    if opts.get("compat") != "0.10":  # (v2 images keep snapshots too, but keep this one plain)
        qemu_img("snapshot", "-c", "s1", path)
    with open_image(path) as img:
        h = img.header
        fixed = pack_header_fields(h)
        assert fixed == img.pread(0, len(fixed))
        assert len(fixed) == (72 if h.version == 2 else min(h.header_length, 105))
        dump = {f.name: (v, text) for f, v, text in header_dump(h)}
        assert dump["l1_table_offset"] == (h.l1_table_offset, f"0x{h.l1_table_offset:x}")
        assert dump["cluster_bits"][1] == str(h.cluster_bits)
        assert ("incompatible_features" in dump) == (h.version == 3)


def test_error_messages_name_the_field_by_its_offset(tmp_path, qemu):
    from qdebug.engine.errors import CorruptImage

    path = create(str(tmp_path / "a.qcow2"), "1G")
    with open(path, "r+b") as f:
        f.seek(FIELD["l1_table_offset"].offset)
        f.write((0x12345).to_bytes(8, "big"))
    with pytest.raises(CorruptImage, match=r"\(offset 40\)"):
        open_image(path)


def test_info_lists_every_header_field_with_its_value(qemu, tmp_path):
    from qdebug.engine.file.chain import open_chain
    from qdebug.engine.read.summary import info_record

    path = create(str(tmp_path / "a.qcow2"), "1G")
    with open_chain(path) as chain:
        fields = {f["name"]: f for f in info_record(chain, counts=False)["qdebug"]["header-fields"]}
        raw = chain.top.pread(0, 112)
    assert list(fields) == list(SPEC)  # a v3 header of 112 bytes has them all
    for name, f in fields.items():
        assert (f["offset"], f["offset"] + f["size"] - 1) == SPEC[name]
        assert f["value"] == int.from_bytes(raw[f["offset"]:f["offset"] + f["size"]], "big")
