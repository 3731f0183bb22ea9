"""Property tests of the subcluster repair bit logic (pure, no QEMU): every policy yields a bitmap
QEMU accepts, changes only the broken subclusters, and keeps what its name promises."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from qdebug.engine.check.repair import POLICIES, repaired_bitmap
from qdebug.engine.format import constants as C
from qdebug.engine.format.subclusters import SubclusterType as T
from qdebug.engine.format.subclusters import classify

offsets = st.sampled_from([0, 0x50000, 0x7FFF0000, 0x8000000000050000])
bitmaps = st.integers(0, (1 << 64) - 1)


def _types(w0: int, bm: int):
    return classify(np.array([w0], dtype=np.uint64), np.array([bm], dtype=np.uint64), extended=True)


@given(offsets, bitmaps, st.sampled_from(POLICIES))
def test_result_is_valid_and_local(w0, bm, policy):
    new, scs = repaired_bitmap(w0, bm, policy)
    assert not (_types(w0, new) == T.INVALID).any()
    changed = (bm ^ new) | ((bm ^ new) >> 32)
    assert {i for i in range(32) if changed >> i & 1} <= set(scs)
    if not (_types(w0, bm) == T.INVALID).any():
        assert new == bm  # a valid entry is left alone


@given(st.sampled_from([0x50000, 0x8000000000090000]), bitmaps)
def test_policies_keep_their_promise(w0, bm):
    both = bm & (bm >> 32) & 0xFFFFFFFF
    keep, _ = repaired_bitmap(w0, bm, "keep-data")
    zero, _ = repaired_bitmap(w0, bm, "zero")
    unalloc, _ = repaired_bitmap(w0, bm, "unallocate")
    assert keep & 0xFFFFFFFF == bm & 0xFFFFFFFF  # every allocated subcluster stays data
    assert zero >> 32 == bm >> 32 and zero & both == 0  # broken ones read zero
    assert unalloc & both == 0 and (unalloc >> 32) & both == 0  # broken ones fall through


@given(bitmaps)
def test_unallocated_and_compressed(bm):
    new, scs = repaired_bitmap(0, bm, "keep-data")
    assert new == bm & ~0xFFFFFFFF and scs == [i for i in range(32) if bm >> i & 1]
    new, _ = repaired_bitmap(C.QCOW_OFLAG_COMPRESSED | 0x50000, bm, "zero")
    assert new == 0
