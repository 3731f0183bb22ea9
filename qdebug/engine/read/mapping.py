"""`qemu-img map` extents, computed chunk by chunk and merged exactly as qemu-img merges them.

qemu-img asks the block layer for the status of each range (descending the backing chain until a
layer answers with DATA or ZERO) and merges neighbours with equal depth/present/zero/data and a
contiguous host offset. Here whole chunks of the guest space are resolved with numpy
(status.resolve) and merged with vector ops; output is streamed so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import QcowError
from ..format.subclusters import SubclusterType as T
from .guest import fails_at_request_start, invalid_entry
from .status import _HOST_KINDS, DECISIVE, IS_DATA, IS_ZERO, QuietMap, resolve_layers

DEFAULT_CHUNK = 1 << 32  # guest bytes resolved per step, at least
CHUNK_CLUSTERS = 1 << 16  # ... and at least this many clusters of the top layer


@dataclass
class Extents:
    """A batch of map extents (numpy columns)."""

    start: np.ndarray
    length: np.ndarray
    depth: np.ndarray
    present: np.ndarray
    zero: np.ndarray
    data: np.ndarray
    has_offset: np.ndarray
    offset: np.ndarray
    compressed: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def take(self, idx) -> "Extents":
        return Extents(*(getattr(self, f)[idx] for f in _FIELDS))

    @staticmethod
    def concat(a: "Extents", b: "Extents") -> "Extents":
        return Extents(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in _FIELDS))


_FIELDS = ("start", "length", "depth", "present", "zero", "data", "has_offset", "offset", "compressed")


def _merge(e: Extents) -> Extents:
    """qemu-img's entry_mergeable over a batch: keep heads of runs of mergeable neighbours."""
    if len(e) <= 1:
        return e
    same = ((e.depth[1:] == e.depth[:-1]) & (e.present[1:] == e.present[:-1]) & (e.zero[1:] == e.zero[:-1])
            & (e.data[1:] == e.data[:-1]) & (e.has_offset[1:] == e.has_offset[:-1]))
    contiguous = ~e.has_offset[1:] | (e.offset[1:] == e.offset[:-1] + e.length[:-1])
    brk = ~(same & contiguous)
    heads = np.concatenate([[0], np.flatnonzero(brk) + 1])
    ends = np.concatenate([heads[1:], [len(e)]])
    out = e.take(heads)
    total = np.cumsum(np.concatenate([[0], e.length]))
    out.length = total[ends] - total[heads]
    return out


def map_extents(chain, start: int = 0, end: int | None = None, chunk: int | None = None) -> Iterator[Extents]:
    """Yield merged extents covering [start, end), batch by batch (the last one of each batch is
    held back until it is known not to merge with the next)."""
    end = chain.size if end is None else min(end, chain.size)
    if chunk is None:
        chunk = max(DEFAULT_CHUNK, getattr(chain.top, "cluster_size", 0) * CHUNK_CLUSTERS)
    pending: Extents | None = None
    pos = start
    quiet = QuietMap(chain.layers)
    while pos < end:
        stop = min(end, pos + chunk)
        busy = quiet.next_busy(pos)
        if busy > pos:  # HX: nothing in any layer up to `busy`: resolve the gap in one pass
            stop = min(end, busy)
        p = resolve_layers(chain.layers, pos, stop, seek_holes=True)
        bad = np.flatnonzero(p.kind == T.INVALID)
        upto = int(bad[0]) if len(bad) else len(p)
        if upto and (upto == len(p) or fails_at_request_start(chain, int(p.depth[upto]), int(p.start[upto]))):
            # (an error QEMU meets only where a request starts there: every extent before the
            # one under way is printed first; an invalid bitmap fails the scan that reaches it)
            k = p.kind[:upto]
            present = DECISIVE[k]
            e = Extents(p.start[:upto], p.end[:upto] - p.start[:upto], p.depth[:upto], present,
                        IS_ZERO[k] | ~present, IS_DATA[k], _HOST_KINDS[k], p.host[:upto], k == T.COMPRESSED)
            if pending is not None:
                e = Extents.concat(pending, e)
            e = _merge(e)
            pending = e.take(slice(len(e) - 1, None))
            if len(e) > 1:
                yield e.take(slice(0, len(e) - 1))
        if upto < len(p):
            raise invalid_entry(chain, int(p.depth[upto]), int(p.start[upto]))
        pos = stop
    if pending is not None and len(pending):
        yield pending


def _template(code: int) -> str:
    """The JSON line for one combination of (depth, present, zero, data, has_offset); {0} start,
    {1} length, {2} offset."""
    depth, rest = divmod(code, 16)
    b = ("false", "true")
    line = (f'{{{{ "start": {{0}}, "length": {{1}}, "depth": {depth}, "present": {b[rest >> 3 & 1]}, '
            f'"zero": {b[rest >> 2 & 1]}, "data": {b[rest >> 1 & 1]}')
    return line + (', "offset": {2}}}' if rest & 1 else "}}")


_TEMPLATES: dict[int, str] = {}
_LINES_PER_WRITE = 1 << 16


def format_json_batch(e: Extents) -> list[str]:
    """qemu-img map --output=json lines for a batch (without separators).

    The flag columns pick one of a few line templates with numpy; per extent only the numbers are
    formatted, by str.format in C through map() (measured faster here than building the digits
    with numpy: int64 division is slow)."""
    if not len(e):
        return []
    code = (e.depth.astype(np.int64) * 16 + e.present.astype(np.int64) * 8 + e.zero.astype(np.int64) * 4
            + e.data.astype(np.int64) * 2 + e.has_offset.astype(np.int64))
    uniq, inv = np.unique(code, return_inverse=True)
    table = np.array([_TEMPLATES.get(c) or _TEMPLATES.setdefault(c, _template(c)) for c in uniq.tolist()],
                     dtype=object)
    return list(map(str.format, table[inv].tolist(), e.start.tolist(), e.length.tolist(), e.offset.tolist()))


def write_json(chain, stream, **kw) -> None:
    """Stream the JSON array exactly as qemu-img map --output=json prints it."""
    first = True
    stream.write("[")
    try:
        for batch in map_extents(chain, **kw):
            for a in range(0, len(batch), _LINES_PER_WRITE):  # bounded text per write, however dense the batch
                lines = format_json_batch(batch.take(slice(a, a + _LINES_PER_WRITE)))
                if not first:
                    stream.write(",\n")
                stream.write(",\n".join(lines))
                first = False
    except QcowError:
        if not first:  # qemu-img ends every element it printed with ",\n": each one had a next
            stream.write(",\n")
        raise
    stream.write("]\n")
