"""The interval set behind a step's saved bytes and a mapping's holes, against a plain set of ints."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qdebug.engine.file.intervals import Intervals

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 80), st.integers(0, 80)), max_size=40)


@settings(max_examples=500, deadline=None)
@given(ops=ops, a=st.integers(0, 80), b=st.integers(0, 80))
def test_intervals_match_a_set_of_points(ops, a, b):
    s, ref = Intervals(), set()
    for add, x, y in ops:
        x, y = min(x, y), max(x, y)
        (s.add if add else s.remove)(x, y)
        (ref.update if add else ref.difference_update)(range(x, y))
    flat = s.flat
    assert all(flat[i] < flat[i + 1] for i in range(len(flat) - 1)), "disjoint, merged, sorted"
    assert {i for x, y in s for i in range(x, y)} == ref
    a, b = min(a, b), max(a, b)
    assert {i for x, y in s.gaps(a, b) for i in range(x, y)} == set(range(a, b)) - ref
    assert {i for x, y in s.overlaps(a, b) for i in range(x, y)} == set(range(a, b)) & ref
