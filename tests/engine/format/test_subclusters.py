"""Property tests: masks, classification, counts, range types, bitmap strings and the vectorized
block-status units against a plain per-bit reference written here from the table in
the qcow2 spec's extended L2 rules (one subcluster at a time, no bit tricks)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qdebug.engine.format import constants as C
from qdebug.engine.format.subclusters import (
    TYPE_CHARS,
    bitmap_string,
    bitmap_strings,
    classify,
    clz32,
    ctz32,
    sub_alloc_range,
    subcluster_range_type,
    type_counts,
)
from qdebug.engine.format.subclusters import SubclusterType as T
from qdebug.engine.read.status import _HOST_KINDS, cluster_units, coalesce, l2_runs
from qdebug.engine.read.summary import _count_batch

OFFSET_MASK = C.L2E_OFFSET_MASK


# ---- reference -----------------------------------------------------------------------------------
def ref_bit(v: int, i: int) -> int:
    return (v >> i) & 1


def ref_types(word0: int, bitmap: int, extended: bool, allocated: bool | None = None) -> list[T]:
    """Types of every subcluster (one for standard L2), from the table in the doc (`allocated`:
    whether the entry counts as allocated, when not by its offset alone)."""
    if ref_bit(word0, 62):
        return [T.COMPRESSED] * (32 if extended else 1)
    allocated = (word0 & OFFSET_MASK) != 0 if allocated is None else allocated
    if not extended:
        zero = ref_bit(word0, 0) == 1
        if allocated:
            return [T.ZERO_ALLOC if zero else T.NORMAL]
        return [T.ZERO_PLAIN if zero else T.UNALLOCATED_PLAIN]
    a = [ref_bit(bitmap, i) for i in range(32)]
    z = [ref_bit(bitmap, 32 + i) for i in range(32)]
    if allocated:
        if any(a[i] and z[i] for i in range(32)):
            return [T.INVALID] * 32
        return [T.ZERO_ALLOC if z[i] else T.NORMAL if a[i] else T.UNALLOCATED_ALLOC for i in range(32)]
    if any(a):
        return [T.INVALID] * 32
    return [T.ZERO_PLAIN if z[i] else T.UNALLOCATED_PLAIN for i in range(32)]


def ref_type(word0: int, bitmap: int, sc: int, extended: bool) -> T:
    return ref_types(word0, bitmap, extended)[sc if extended else 0]


def ref_range(word0: int, bitmap: int, sc_from: int, extended: bool) -> tuple[T, int]:
    types = ref_types(word0, bitmap, extended)
    t = types[sc_from]
    if not extended:
        return t, 1
    if t in (T.COMPRESSED, T.INVALID):
        return t, 32 - sc_from
    n = 0
    for sc in range(sc_from, 32):
        if types[sc] != t:
            break
        n += 1
    return t, n


# ---- strategies ----------------------------------------------------------------------------------
halves = st.one_of(st.just(0), st.just(0xFFFFFFFF), st.integers(0, 2**32 - 1),
                   st.tuples(st.integers(0, 32), st.integers(0, 32)).map(
                       lambda xy: sub_alloc_range(min(xy), max(xy))))
bitmaps = st.one_of(
    st.integers(0, 2**64 - 1),
    st.tuples(halves, halves).map(lambda az: (az[0] & ~az[1] & 0xFFFFFFFF) | (az[1] << 32)),  # valid, allocated
    halves.map(lambda z: z << 32),  # valid, unallocated
    st.just(0),
)
word0s = st.one_of(
    st.just(0),
    st.builds(lambda host, copied, low: (host << 9) | (copied << 63) | low,
              st.integers(1, 2**47 - 1), st.integers(0, 1), st.integers(0, 511)),
    st.integers(0, 2**64 - 1).map(lambda v: v | (1 << 62)),  # compressed descriptor
    st.integers(0, 2**64 - 1),
    st.integers(0, 1),  # only the zero flag
)
entries = st.lists(st.tuples(word0s, bitmaps), min_size=1, max_size=40)


def arrays(es):
    return np.array([w for w, _ in es], dtype=np.uint64), np.array([b for _, b in es], dtype=np.uint64)


def parse_bitmap_string(s: str) -> tuple[int, int]:
    """(alloc half, zero half) from a `--0-NN-0_...` string (C and ! are rejected)."""
    s = s.replace("_", "")
    if len(s) != 32:
        raise ValueError(f"bitmap string needs 32 subclusters, got {len(s)}")
    a = z = 0
    for i, ch in enumerate(s):
        if ch == "N":
            a |= 1 << i
        elif ch == "0":
            z |= 1 << i
        elif ch != "-":
            raise ValueError(f"unexpected character {ch!r} at subcluster {i}")
    return a, z


# ---- masks ---------------------------------------------------------------------------------------
@given(st.integers(0, 32), st.integers(0, 32))
def test_range_masks(x, y):
    x, y = min(x, y), max(x, y)
    ref = sum(1 << i for i in range(x, y))
    assert sub_alloc_range(x, y) == ref


@given(st.integers(0, 2**32 - 1))
def test_ctz_clz(v):
    assert ctz32(v) == next((i for i in range(32) if ref_bit(v, i)), 32)
    assert clz32(v) == next((31 - i for i in range(31, -1, -1) if ref_bit(v, i)), 32)


# ---- classification ------------------------------------------------------------------------------
@settings(max_examples=100)
@given(entries, st.booleans())
def test_classify_and_counts(es, extended):
    w0, bm = arrays(es)
    ref = [ref_types(w, b, extended) for w, b in es]
    got = classify(w0, bm if extended else None, extended=extended)
    assert got.tolist() == [[int(t) for t in row] for row in ref]
    counts = Counter(t for row in ref for t in row)
    assert type_counts(w0, bm if extended else None, extended=extended).tolist() == [counts[t] for t in T]
    # the whole-image counter works on raw (big-endian bytes read as little-endian) entries
    raw_w0 = w0.astype(">u8").view("<u8")
    raw_bm = bm.astype(">u8").view("<u8")
    acc = np.zeros(len(T), dtype=np.int64)
    _count_batch(raw_w0, raw_bm if extended else None, acc)
    if extended:
        plain, nal, ncomp, nbad, normal, za, zp = acc.tolist()
        got_counts = {T.UNALLOCATED_PLAIN: 32 * plain - zp, T.ZERO_PLAIN: zp, T.NORMAL: normal,
                      T.ZERO_ALLOC: za, T.UNALLOCATED_ALLOC: 32 * nal - normal - za,
                      T.COMPRESSED: 32 * ncomp, T.INVALID: 32 * nbad}
        assert [got_counts[t] for t in T] == [counts[t] for t in T]
    else:
        assert acc.tolist() == [counts[t] for t in T]


@settings(max_examples=300)
@given(word0s, bitmaps, st.integers(0, 31), st.booleans())
def test_subcluster_range_type(word0, bitmap, sc_from, extended):
    if not extended:
        sc_from = 0
    assert subcluster_range_type(word0, bitmap, sc_from, extended=extended) == ref_range(word0, bitmap, sc_from,
                                                                                       extended)


@given(entries)
def test_bitmap_strings(es):
    w0, bm = arrays(es)
    strings = bitmap_strings(classify(w0, bm, extended=True))
    for (w, b), s in zip(es, strings):
        chars = "".join(TYPE_CHARS[t] for t in ref_types(w, b, True))
        assert s == "_".join(chars[i:i + 8] for i in range(0, 32, 8))
        assert bitmap_string(w, b) == s
        t = ref_types(w, b, True)
        if T.INVALID not in t and T.COMPRESSED not in t and (w & OFFSET_MASK):
            assert parse_bitmap_string(s) == (b & 0xFFFFFFFF, b >> 32)


# ---- block-status units --------------------------------------------------------------------------
def expand(runs, first: int, n: int, cs: int):
    """Per-subcluster (type, host) of runs covering clusters [first, first + n)."""
    scs = cs // 32
    out = []
    for s, e, k, h in zip(runs.start.tolist(), runs.end.tolist(), runs.kind.tolist(), runs.host.tolist()):
        assert s % scs == 0 and e % scs == 0 and s < e
        for pos in range(s, e, scs):
            out.append((k, h + (pos - s) if _HOST_KINDS[k] else h))
    assert runs.start[0] == first * cs and runs.end[-1] == (first + n) * cs
    assert (runs.start[1:] == runs.end[:-1]).all()
    return out


@settings(max_examples=100)
@given(entries, st.integers(0, 6), st.integers(0, 1000), st.booleans(), st.sampled_from([16384, 65536, 2 << 20]))
def test_cluster_units_against_reference(es, gap, first, extended, cs):
    """Runs expanded back to subclusters equal the reference, with and without skipping the entries
    that continue a run (copies of an entry, or its next host cluster, after each entry: `gap`)."""
    es = [x for w, b in es for x in [(w, b)] + [(0, 0)] * gap + [(w + k * cs, b) for k in range(gap)]]
    es = [(w % 2**64, b) for w, b in es]
    w0, bm = arrays(es)
    n = len(es)
    scs = cs // 32
    ref = []
    for w, b in es:
        types = ref_types(w, b, extended) * (1 if extended else 32)
        if not w & (1 << 62) and (w & OFFSET_MASK) % cs:  # QEMU's reads fail on an unaligned cluster
            types = [T.INVALID] * 32
        for sc, t in enumerate(types):
            host = ((w & OFFSET_MASK) + sc * scs if t in (T.NORMAL, T.ZERO_ALLOC, T.UNALLOCATED_ALLOC)
                    else w if t == T.COMPRESSED else -1)
            ref.append((int(t), host if host < 2**63 else host - 2**64))
    bmx = bm if extended else None
    units = cluster_units(w0, bmx, first, cs, extended=extended)
    assert expand(units, first, n, cs) == ref
    merged = coalesce(units)
    assert expand(merged, first, n, cs) == ref
    sparse = coalesce(l2_runs(w0, bmx, first, first + n, cs, extended))
    assert [a.tolist() for a in (sparse.start, sparse.end, sparse.kind, sparse.host)] == \
           [a.tolist() for a in (merged.start, merged.end, merged.kind, merged.host)]


# ---- external data file --------------------------------------------------------------------------
def ref_types_data_file(word0: int, bitmap: int, extended: bool, guest: int) -> list[T]:
    """QEMU 7.2 with an external data file: offset 0 with COPIED is allocated; a compressed entry,
    or an allocated one whose host offset is not the guest offset, fails every read (INVALID)."""
    n = 32 if extended else 1
    if ref_bit(word0, 62):
        return [T.INVALID] * n
    host = word0 & OFFSET_MASK
    allocated = host != 0 or ref_bit(word0, 63) == 1
    if allocated and host != guest:
        return [T.INVALID] * n
    return ref_types(word0, bitmap, extended, allocated)


data_file_entries = st.lists(st.tuples(
    st.sampled_from(["at-guest", "at-guest", "zero-copied", "elsewhere", "compressed", "unallocated", "unaligned"]),
    st.integers(0, 1), st.integers(0, 1), bitmaps, st.integers(0, 3)), min_size=1, max_size=30)


@settings(max_examples=150)
@given(data_file_entries, st.integers(0, 300), st.booleans(), st.sampled_from([16384, 65536]))
def test_cluster_units_with_an_external_data_file(es, first, extended, cs):
    """Runs of an image with an external data file, expanded to subclusters, equal the reference;
    skipping the entries that continue a run (l2_runs) changes nothing. Each entry is repeated
    `reps` times as the next guest cluster would continue it (its next host cluster)."""
    w0s, bms, ref = [], [], []
    scs = cs // 32
    for what, copied, zflag, bm, reps in es:
        for _ in range(reps + 1):
            guest = (first + len(w0s)) * cs
            host = {"at-guest": guest, "zero-copied": 0, "elsewhere": guest + 7 * cs, "compressed": guest,
                    "unallocated": 0, "unaligned": guest + 512}[what]
            w = host | (copied << 63) | zflag
            if what == "zero-copied":
                w |= 1 << 63
            if what == "compressed":
                w = (1 << 62) | host
            w0s.append(w)
            bms.append(bm)
            types = ref_types_data_file(w, bm, extended, guest) * (1 if extended else 32)
            for sc, t in enumerate(types):
                ref.append((int(t), host + sc * scs if t in (T.NORMAL, T.ZERO_ALLOC, T.UNALLOCATED_ALLOC) else -1))
    w0, bm = np.array(w0s, dtype=np.uint64), np.array(bms, dtype=np.uint64)
    n = len(w0s)
    bmx = bm if extended else None
    units = cluster_units(w0, bmx, first, cs, extended=extended, data_file=True)
    assert expand(units, first, n, cs) == ref
    merged = coalesce(units)
    sparse = coalesce(l2_runs(w0, bmx, first, first + n, cs, extended, data_file=True))
    assert expand(sparse, first, n, cs) == ref
    assert [a.tolist() for a in (sparse.start, sparse.end, sparse.kind, sparse.host)] == \
           [a.tolist() for a in (merged.start, merged.end, merged.kind, merged.host)]
