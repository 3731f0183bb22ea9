"""Disjoint byte ranges as one flat sorted list: what a journal step has saved, where a mapping
shows holes. `bisect` on the flat list [s0, e0, s1, e1, ...] keeps each query logarithmic."""

from __future__ import annotations

import bisect


class Intervals:
    """A set of half-open ranges [s, e); adjacent or overlapping ranges merge."""

    __slots__ = ("flat",)

    def __init__(self) -> None:
        self.flat: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.flat)

    def __iter__(self):
        f = self.flat
        return ((f[i], f[i + 1]) for i in range(0, len(f), 2))

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set, in order."""
        cov = self.flat
        out = []
        i = bisect.bisect_right(cov, start)
        pos = start
        if i % 2:  # start lies inside a range
            pos = cov[i]
            i += 1
        while pos < end:
            if i >= len(cov) or cov[i] >= end:
                out.append((pos, end))
                break
            if cov[i] > pos:
                out.append((pos, cov[i]))
            pos = cov[i + 1]
            i += 2
        return out

    def overlaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) in the set, in order."""
        cov = self.flat
        out = []
        i = bisect.bisect_right(cov, start)
        if i % 2:
            i -= 1
        while i < len(cov) and cov[i] < end:
            s, e = max(cov[i], start), min(cov[i + 1], end)
            if s < e:
                out.append((s, e))
            i += 2
        return out

    def add(self, start: int, end: int) -> None:
        self._splice(start, end, 0)

    def remove(self, start: int, end: int) -> None:
        self._splice(start, end, 1)

    def _splice(self, start: int, end: int, parity: int) -> None:
        """Make all of [start, end) in (parity 0) or out (parity 1) of the set: the boundaries
        inside it go, and `start` / `end` become boundaries where the state changes at them."""
        if start >= end:
            return
        cov = self.flat
        i = bisect.bisect_left(cov, start)
        j = bisect.bisect_right(cov, end)
        new = []
        if i % 2 == parity:
            new.append(start)
        if j % 2 == parity:
            new.append(end)
        cov[i:j] = new

    def clear(self) -> None:
        self.flat = []
