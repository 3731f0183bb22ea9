"""Prototype of issue #14's `--policy minimal-cow` (NOT QEMU, never used by replay; not wired in).

QEMU 7.2's calculate_l2_meta copies one contiguous range per L2Meta: from the first allocated
subcluster (or the written one) to the last, so `-` and `0` subclusters lying between the write and
the old cluster's data are copied too and become `N` (the seed's "more I/O than strictly
necessary"). The minimal policy copies only what must be preserved, per cluster of the write:

* the remainders of the first and last written subclusters (they become `N` as a whole);
* when the data moves to a new host cluster (not keep_old): every old `N` subcluster the write does
  not cover (its data is only reachable through the old cluster), and for a compressed old cluster
  everything outside the write (a compressed cluster has no subclusters);
* nothing else: `-` stays `-` (still reads the backing file or zeros), `0` stays `0`.

The bitmap after is the old one with the written subclusters `N` (and, for a moved cluster, the old
`N` ones still `N`); zero bits outside the write are kept. The regions may be several per cluster,
so the policy can cost more requests than QEMU's single merged write while it copies fewer bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_ALLOC = 0xFFFFFFFF


@dataclass(frozen=True)
class MinimalCow:
    """One cluster's COW under the minimal policy: byte ranges relative to the cluster start."""

    regions: tuple[tuple[int, int], ...]  # [start, end), sorted, merged
    bitmap_after: int  # the 64-bit extended L2 bitmap (zero bits << 32 | alloc bits)

    @property
    def cow_bytes(self) -> int:
        return sum(e - s for s, e in self.regions)


def _mask(first: int, last: int) -> int:
    return (1 << (last + 1)) - (1 << first)


def mask_runs(mask: int) -> list[tuple[int, int]]:
    """The runs of set bits of `mask` as (first, last) bit numbers, lowest first."""
    out = []
    i = 0
    while mask >> i:
        if mask >> i & 1:
            j = i
            while mask >> (j + 1) & 1:
                j += 1
            out.append((i, j))
            i = j + 1
        else:
            i += 1
    return out


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def minimal_cow(old_bitmap: int, *, compressed: bool, keep_old: bool, w_from: int, w_to: int,
                cluster_size: int, nsc: int = 32) -> MinimalCow:
    """The minimal COW of a write of [w_from, w_to) (cluster-relative, non-empty) into one cluster.

    keep_old: the cluster is written in place (COPIED); otherwise its data moves to a new host
    cluster. compressed: the old cluster is compressed (then keep_old is false)."""
    sc = cluster_size // nsc
    s0, s1 = w_from // sc, (w_to - 1) // sc
    written = _mask(s0, s1)
    alloc, zero = old_bitmap & ALL_ALLOC, old_bitmap >> 32
    if compressed:
        return MinimalCow(_merge([(0, w_from), (w_to, cluster_size)]), ALL_ALLOC)
    regions = []
    if not (keep_old and alloc >> s0 & 1):  # in place, an N subcluster keeps its own bytes
        regions.append((s0 * sc, w_from))
    if not (keep_old and alloc >> s1 & 1):
        regions.append((w_to, (s1 + 1) * sc))
    if not keep_old:
        regions += [(i * sc, (j + 1) * sc) for i, j in mask_runs(alloc & ~written)]
    return MinimalCow(_merge(regions), (zero & ~written) << 32 | (alloc | written))


def avoidable_mask(old_bitmap: int, cow_from: int, cow_to: int, w_from: int, w_to: int,
                   cluster_size: int, nsc: int = 32) -> int:
    """Subclusters of QEMU's COW range [cow_from, cow_to) that were `-` or `0` and that the write does
    not touch: the cow-avoidable-bytes of the stats (notes/stats-design.md). Not for a compressed
    old cluster (nothing of it is avoidable)."""
    sc = cluster_size // nsc
    if cow_to <= cow_from:
        return 0
    cow = _mask(cow_from // sc, (cow_to - 1) // sc)
    return cow & ~(old_bitmap & ALL_ALLOC) & ~_mask(w_from // sc, (w_to - 1) // sc)
