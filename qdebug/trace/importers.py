"""Real workloads -> qemu-io scripts: what `qdebug trace import` makes of a fio iolog or a QEMU
trace-event log.

Both readers (`fio_iolog`, `qemu_events`) reduce their input to `GuestIO` records: the guest's
requests, in order, without data. Here they become qemu-io commands that both qemu-io and
`qdebug replay` run. A recorded write carries no data, so each gets a pattern byte derived from
(seed, its index): deterministic, never 0 (indistinguishable from zeros), and different from its
neighbours' almost always. The guest content every write leaves is tracked, so a recorded read
becomes a `read -P` check wherever the whole range holds one known pattern (a plain `read`
otherwise: bytes the workload never wrote, or discarded ones, which QEMU may keep or zero).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..engine.write.ops import Command


class ImportProblem(ValueError):
    """Input that cannot be imported; the message names the file and line."""


@dataclass(frozen=True)
class GuestIO:
    """One guest request of a recorded workload: op is write | zero | discard | read | flush | compressed."""

    op: str
    offset: int = 0
    length: int = 0
    unmap: bool = False  # zero writes that may unmap (BDRV_REQ_MAY_UNMAP, `write -z -u`)
    lineno: int = 0


@dataclass(frozen=True)
class ImportedTrace:
    """The qemu-io commands made from a recorded workload, and what the import left out."""

    source: str
    kind: str  # 'fio' | 'qemu-trace'
    commands: tuple[Command, ...]
    size_needed: int  # the smallest virtual size every command fits in
    selected: str = ""  # the file (fio) or node (QEMU) whose requests these are
    skipped: dict[str, int] = field(default_factory=dict)  # e.g. {"zero-length requests": 3}

    def to_text(self) -> str:
        """The qemu-io script: one command a line, no comments (qemu-io has none)."""
        return "".join(c.to_qemu_io() + "\n" for c in self.commands)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.commands:
            key = ("compressed write" if c.compressed else "zero write" if c.zero else c.op)
            out[key] = out.get(key, 0) + 1
        return out


def pattern_byte(seed: int, index: int) -> int:
    """Pattern of the `index`-th write: splitmix64 of (seed, index) folded into 1..255."""
    x = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return 1 + x % 255


class GuestContent:
    """What the guest reads where, as far as the imported trace decides it: sorted, disjoint
    runs [start, end) -> pattern byte, or None (unknown: never written, or discarded)."""

    def __init__(self) -> None:
        self._starts: list[int] = [0]
        self._values: list[int | None] = [None]  # run i covers [starts[i], starts[i+1])

    def _split(self, at: int) -> int:
        """Index of the run that starts at `at` (splitting the run that contains it)."""
        i = bisect.bisect_right(self._starts, at) - 1
        if self._starts[i] == at:
            return i
        self._starts.insert(i + 1, at)
        self._values.insert(i + 1, self._values[i])
        return i + 1

    def set(self, start: int, end: int, value: int | None) -> None:
        if end <= start:
            return
        i = self._split(start)
        j = self._split(end)
        self._starts[i:j] = [start]
        self._values[i:j] = [value]
        # merge with equal neighbours so the list stays as short as the content is simple
        if i + 1 < len(self._starts) and self._values[i + 1] == value:
            del self._starts[i + 1], self._values[i + 1]
        if i > 0 and self._values[i - 1] == value:
            del self._starts[i], self._values[i]

    def uniform(self, start: int, end: int) -> int | None:
        """The one known byte [start, end) reads as, or None if it is unknown or mixed."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i + 1 < len(self._starts) and self._starts[i + 1] < end:
            return None
        return self._values[i]


def to_commands(records: list[GuestIO], seed: int) -> tuple[list[Command], int]:
    """GuestIO records -> qemu-io Commands (patterns assigned, reads checked where decided), and
    the smallest virtual size they fit in."""
    content = GuestContent()
    out: list[Command] = []
    writes = 0
    size = 0
    for r in records:
        if r.op == "flush":
            out.append(Command("flush"))
            continue
        end = r.offset + r.length
        size = max(size, end)
        if r.op in ("write", "compressed"):
            p = pattern_byte(seed, writes)
            writes += 1
            out.append(Command("write", r.offset, r.length, pattern=p, compressed=r.op == "compressed"))
            content.set(r.offset, end, p)
        elif r.op == "zero":
            out.append(Command("write", r.offset, r.length, zero=True, unmap=r.unmap))
            content.set(r.offset, end, 0)
        elif r.op == "discard":
            out.append(Command("discard", r.offset, r.length))
            content.set(r.offset, end, None)  # QEMU ignores unaligned pieces: content unknown
        elif r.op == "read":
            out.append(Command("read", r.offset, r.length, pattern=content.uniform(r.offset, end)))
        else:  # pragma: no cover - the readers make only the ops above
            raise ValueError(f"unknown guest op {r.op!r}")
    return out, size


def import_trace(path: str, kind: str, *, select: str | None = None, pattern_seed: int = 1) -> ImportedTrace:
    """Read a fio iolog (`kind` 'fio') or a QEMU trace-event log ('qemu-trace') into a trace."""
    from . import fio_iolog, qemu_events

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if kind == "fio":
                records, selected, skipped = fio_iolog.read_iolog(f, path, select)
            elif kind == "qemu-trace":
                records, selected, skipped = qemu_events.read_events(f, path, select)
            else:
                raise ImportProblem(f"unknown trace kind {kind!r} (expected fio or qemu-trace)")
    except OSError as e:
        raise ImportProblem(f"{path}: cannot read: {e.strerror}") from None
    commands, size = to_commands(records, pattern_seed)
    return ImportedTrace(path, kind, tuple(commands), size, selected, skipped)
