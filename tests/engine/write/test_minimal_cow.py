"""The minimal-COW prototype (issue #14 item 3) against QEMU's calculate_l2_meta on one cluster:
it copies a subset of what QEMU copies, the difference is exactly the avoidable subclusters, and the
guest reads every subcluster it does not write as before."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qdebug.engine.write.minimal_cow import avoidable_mask, minimal_cow

CS = 65536
SC = CS // 32


def _qemu_range(old: int, compressed: bool, keep_old: bool, w_from: int, w_to: int) -> tuple[int, int]:
    """QEMU 7.2's [cow_start, cow_end end) for one cluster (docs: calculate_l2_meta, 4.5)."""
    s0, s1 = w_from // SC, (w_to - 1) // SC
    alloc = old & 0xFFFFFFFF
    if compressed:
        return 0, CS
    if keep_old:
        start = w_from if alloc >> s0 & 1 else s0 * SC
        end = w_to if alloc >> s1 & 1 else (s1 + 1) * SC
        return start, end
    ctz = (alloc & -alloc).bit_length() - 1 if alloc else 32
    clz = 32 - alloc.bit_length()
    return min(s0, ctz) * SC, CS - min(31 - s1, clz) * SC


def _kind(bitmap: int, i: int) -> str:
    return "N" if bitmap >> i & 1 else "0" if bitmap >> (32 + i) & 1 else "-"


bitmaps = st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)).map(
    lambda t: (t[1] & ~t[0]) << 32 | t[0])


@settings(max_examples=2000, deadline=None)
@given(bitmaps, st.booleans(), st.integers(0, CS - 1), st.integers(1, CS))
def test_minimal_cow_is_qemus_minus_the_avoidable(old, keep_old, w_from, n):
    w_to = min(CS, w_from + n)
    mine = minimal_cow(old, compressed=False, keep_old=keep_old, w_from=w_from, w_to=w_to, cluster_size=CS)
    qs, qe = _qemu_range(old, False, keep_old, w_from, w_to)
    qemu_cow = (w_from - qs) + (qe - w_to)
    # a subset of QEMU's range, never the written bytes
    for s, e in mine.regions:
        assert qs <= s < e <= qe and (e <= w_from or s >= w_to)
    avoid = avoidable_mask(old, qs, qe, w_from, w_to, CS)
    assert qemu_cow - mine.cow_bytes == bin(avoid).count("1") * SC
    if keep_old:
        assert avoid == 0  # in place, QEMU already copies only the written subclusters' remainders
    # the guest reads every unwritten subcluster as before; moved data is copied
    s0, s1 = w_from // SC, (w_to - 1) // SC
    for i in range(32):
        if s0 <= i <= s1:
            assert _kind(mine.bitmap_after, i) == "N"
            continue
        assert _kind(mine.bitmap_after, i) == _kind(old, i)
        if _kind(old, i) == "N" and not keep_old:
            assert any(s <= i * SC and (i + 1) * SC <= e for s, e in mine.regions)
        else:
            assert not any(s < (i + 1) * SC and i * SC < e for s, e in mine.regions)
    # QEMU's bitmap after sets [cow_start, cow_end) to N: minimal keeps a subset of those N
    qemu_after_alloc = (old | ((1 << ((qe - 1) // SC + 1)) - (1 << (qs // SC)))) & 0xFFFFFFFF
    assert mine.bitmap_after & 0xFFFFFFFF & ~qemu_after_alloc == 0


def test_seed_example():
    """`--0-NN-0_NNNNNNNN_NNNNNNNN_NNNNNNNN`, write to sc 8 into a new cluster: QEMU copies sc 4-7
    and 9-31 (54 KiB); minimal leaves sc 6 (`-`) and 7 (`0`): 50 KiB, `--0-NN-0_N...` stays."""
    old = 0x00000084FFFFFF30
    mine = minimal_cow(old, compressed=False, keep_old=False, w_from=16 * 1024, w_to=18 * 1024, cluster_size=CS)
    assert mine.regions == ((8 * 1024, 12 * 1024), (18 * 1024, CS))
    assert mine.cow_bytes == 50 * 1024
    assert mine.bitmap_after == 0x00000084FFFFFF30
    assert avoidable_mask(old, 8 * 1024, CS, 16 * 1024, 18 * 1024, CS) == 0b11 << 6


def test_compressed_source_copies_everything_else():
    mine = minimal_cow(0, compressed=True, keep_old=False, w_from=3072, w_to=3584, cluster_size=CS)
    assert mine.regions == ((0, 3072), (3584, CS)) and mine.bitmap_after == 0xFFFFFFFF
