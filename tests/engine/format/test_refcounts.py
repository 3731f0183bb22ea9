"""Refcount entry codecs for every width, and an image's refcounts as qemu-img check counts them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdebug.engine.file.image import open_image
from qdebug.engine.format.refcounts import pack_refcounts, unpack_refcounts
from tests.qemu import create, qemu_check, qemu_io


@st.composite
def refcount_arrays(draw):
    order = draw(st.integers(0, 6))
    bits = 1 << order
    per = max(1, 8 // bits)
    n = draw(st.integers(0, 16)) * per
    vals = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    return order, np.array(vals, dtype=np.uint64)


@given(refcount_arrays())
def test_pack_unpack_round_trip(arg):
    order, vals = arg
    buf = pack_refcounts(vals, order)
    assert len(buf) == len(vals) * (1 << order) // 8
    assert np.array_equal(unpack_refcounts(buf, order), vals)


def test_sub_byte_entries_start_at_the_least_significant_bit():
    assert pack_refcounts(np.array([1, 0, 0, 0, 0, 0, 0, 1]), 0) == b"\x81"
    assert pack_refcounts(np.array([3, 1, 0, 2]), 1) == bytes([0b10_00_01_11])
    assert pack_refcounts(np.array([0xA, 0x5]), 2) == b"\x5a"
    assert pack_refcounts(np.array([0x1234]), 4) == b"\x12\x34"


def test_values_that_do_not_fit_are_refused():
    with pytest.raises(ValueError):
        pack_refcounts(np.array([2] + [0] * 7), 0)
    with pytest.raises(ValueError):
        pack_refcounts(np.array([1, 0, 1]), 0)


def set_refcount(img, cluster: int, value: int) -> None:
    """Rewrite the refcount block that covers `cluster` through the codecs."""
    h = img.header
    block = int(img.reftable[cluster // h.refcount_block_entries]) & 0xFFFFFFFFFFFFFE00
    counts = unpack_refcounts(img.pread(block, h.cluster_size), h.refcount_order)
    counts[cluster % h.refcount_block_entries] = value
    img.pwrite(block, pack_refcounts(counts, h.refcount_order))


def get_refcount(img, cluster: int) -> int:
    return img.refcount(cluster)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_get_and_set_match_qemu(qemu, tmp_path, bits):
    """Refcounts read as QEMU counts them; a refcount we leak is the leak qemu-img check reports."""
    img_path = create(str(tmp_path / "a.qcow2"), "4M", refcount_bits=bits)
    qemu_io(img_path, "write -P 1 0 128k")
    with open_image(img_path, writable=True) as img:
        counts = [get_refcount(img, i) for i in range(12)]
        assert counts == [1] * 7 + [0] * 5  # header, reftable, refblock, L1, L2, 2 data clusters
        set_refcount(img, 5, 0)  # a data cluster QEMU counts as referenced once
        assert [get_refcount(img, i) for i in range(12)] == [1] * 5 + [0, 1] + [0] * 5
    rc, out = qemu_check(img_path)
    assert out["corruptions"] > 0  # refcount=0 reference=1 (+ OFLAG_COPIED)
    with open_image(img_path, writable=True) as img:
        set_refcount(img, 5, 1)
    rc, out = qemu_check(img_path)
    assert rc == 0 and out.get("leaks", 0) == 0
