"""check's narrow per-cluster arrays: the reference counts start at one byte a cluster and widen
exactly when a cluster could outgrow them, so counts (overflow included) stay equal to qemu-img's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdebug.engine.check.checker import _Ctx, check_image
from qdebug.engine.file.image import open_image
from qdebug.engine.format import constants as C
from qdebug.engine.write.create import create_image
from tests.qemu import create, qemu_check


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mem") / "a.qcow2")
    create_image(path, 1 << 20)
    return path


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=300), min_size=1, max_size=12),
       st.sampled_from([0, 250, 65530, (1 << 32) - 5]))
def test_references_widen_before_they_overflow(small_image, batches, start):
    """Whatever the increments (dense bincount passes or scattered ones), `refs` equals an int64
    count, from any starting level (near the top of uint8, uint16 and uint32)."""
    with open_image(small_image) as img:
        ctx = _Ctx(img, None)
        ctx.refs = np.full(1000, start, dtype=np.uint8 if start < 256 else np.uint16 if start < 65536 else np.uint32)
        ctx._bound = start
        want = np.full(1000, start, dtype=np.int64)
        for b in batches:
            idx = np.array(b, dtype=np.int64)
            ctx.inc_clusters(idx)
            want += np.bincount(idx, minlength=1000)
        assert (ctx.refs.astype(np.int64) == want).all()
        assert np.iinfo(ctx.refs.dtype).max >= want.max()


def test_a_healthy_image_is_counted_in_one_byte_per_cluster(small_image):
    with open_image(small_image) as img:
        assert check_image(img).references.dtype == np.uint8


def _point_every_entry_at_one_cluster(path: str) -> None:
    """Every L2 entry (preallocated: all of them) refers to the first data cluster."""
    with open_image(path) as img:
        h = img.header
        l2s = [int(e) & C.L1E_OFFSET_MASK for e in img.l1 if int(e)]
        first = int(img.l2_table(l2s[0])[0][0]) & C.L2E_OFFSET_MASK
    mm = np.memmap(path, dtype=">u8", mode="r+")
    step = 2 if h.extended_l2 else 1
    for off in l2s:
        w0 = mm[off // 8: (off + h.cluster_size) // 8: step]
        w0[:] = (w0 & ~np.uint64(C.L2E_OFFSET_MASK)) | np.uint64(first)
    mm.flush()
    del mm


@pytest.mark.qemu
@pytest.mark.parametrize("cluster_size,extended_l2,refcount_bits,clusters", [
    ("4k", False, 8, 300),         # one cluster referenced 300 times: uint8 -> uint16, 45 overflows
    ("64k", True, 16, 70000),      # 70,000 times: one batch alone holds 65,536 (uint32), 4,465 overflows
])
def test_many_references_to_one_cluster_count_as_qemu(tmp_path, cluster_size, extended_l2, refcount_bits, clusters):
    cs = int(cluster_size[:-1]) << 10
    path = create(str(tmp_path / "many.qcow2"), clusters * cs, cluster_size=cluster_size, extended_l2=extended_l2,
                  refcount_bits=refcount_bits, preallocation="metadata")
    _point_every_entry_at_one_cluster(path)
    rc, theirs = qemu_check(path)
    with open_image(path) as img:
        ours = check_image(img)
    mine = ours.counts()
    mine["filename"] = theirs["filename"]
    assert mine == theirs and ours.exit_code == rc == 2
    assert sum(f.kind == "refcount-overflow" for f in ours.findings) == 10  # QEMU's messages, 10 listed
    assert int(ours.references.max()) == (1 << refcount_bits) - 1
