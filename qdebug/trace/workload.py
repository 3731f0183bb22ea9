"""What a whole trace costs (`qdebug stats`) and what it would cost on other geometries (`qdebug whatif`).

Both are dry runs: every command is planned exactly as QEMU 7.2 would run it, on top of what the
earlier ones would have written, and each step's cost (engine/write/cost.py) is added up. The image
`stats` is given is opened read-only; `whatif` plans against fresh images of each geometry made in a
temporary directory (a qcow2 file of a few clusters: no file of the virtual size is ever written).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from itertools import islice
from dataclasses import astuple, dataclass
from typing import Callable, Final, Iterable, Iterator

from ..engine.errors import QcowError
from ..engine.write.cost import Cost, StepCost, add_trace
from ..engine.write.create import create_image
from ..engine.write.ops import Command
from .commands import numbered, parse_line
from .replay import Replay, ReplayMode, quiet_gc
from .syntax import SyntaxProblem


@dataclass(frozen=True)
class TraceCost:
    """The summed cost of a trace's steps; `failed`: commands that fail as they would in QEMU (they
    cost nothing; qemu-io reports them and goes on)."""

    total: StepCost
    commands: int
    failed: int
    errors: tuple[str, ...]  # the first few failures, "SOURCE:LINE: command: error"

    def to_json(self) -> dict:
        return {**self.total.to_json(), "commands": self.commands, "failed-commands": self.failed}


QEMU: Final = "qemu"
MINIMAL_COW: Final = "minimal-cow"  # NOT QEMU: copies only what must be preserved (minimal_cow.py)
POLICIES: Final = (QEMU, MINIMAL_COW)


def trace_cost(image: str, lines: Iterable[str], source: str,
               progress: Callable[[int], None] | None = None, policy: str = QEMU, strict: bool = False,
               force_share: bool = False) -> TraceCost:
    """Dry-run `lines` (qemu-io commands) on `image` and add up what every step costs, planned as
    QEMU does or (policy MINIMAL_COW) with the minimal COW, which is not QEMU's. `strict`: read
    as `qemu-io IMAGE < TRACE` reads it (`parse_trace`)."""
    return commands_cost(image, _parsed(lines, source, strict), source, progress, policy, force_share)


def _parsed(lines: Iterable[str], source: str, strict: bool) -> Iterator[Command]:
    """The commands of `lines` up to a `quit`; a bad line raises QcowError naming it."""
    for lineno, line, cut in numbered(lines, strict):
        try:
            cmd = parse_line(line, lineno, strict)
        except SyntaxProblem as e:
            raise QcowError(f"{source}:{lineno}: {e}{cut}") from None
        if cmd is None:
            continue
        if cmd.op == "quit":
            break
        yield cmd


def commands_cost(image: str, commands: Iterable[Command], source: str,
                  progress: Callable[[int], None] | None = None, policy: str = QEMU,
                  force_share: bool = False) -> TraceCost:
    """`trace_cost` of commands already parsed (`qdebug stats` keeps them from its check of the trace)."""
    total = Cost()
    total.file_size_before = total.file_size_after = os.path.getsize(image) if os.path.exists(image) else 0
    failures: list[tuple[Command, str]] = []
    count = 0
    with Replay(image, mode=ReplayMode.DRY_RUN, source=source, history=False, timing=False,
                force_share=force_share) as replay:
        quiet_gc()
        if policy == MINIMAL_COW:
            replay.engine.use_minimal_cow()
        batch = 4096 if progress is not None else 1 << 62  # (steps between progress reports)
        it = iter(commands)
        while True:
            n = add_trace(replay.engine, islice(it, batch), total, failures, count)
            count += n
            if n < batch:
                break
            progress(count)  # type: ignore[misc]
    errors = tuple(f"{source}:{cmd.lineno}: {cmd.source_text}: {error}" for cmd, error in failures[:5])
    return TraceCost(total.frozen(), count, len(failures), errors)


# ---- what-if geometry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """One geometry a what-if plans on: a fresh image made as `qemu-img create -o ...` would."""

    cluster_size: int
    extended_l2: bool
    refcount_bits: int = 16

    @property
    def label(self) -> str:
        return f"{_short(self.cluster_size)}{' ext-l2' if self.extended_l2 else ''}"


def _short(n: int) -> str:
    for unit, shift in (("M", 20), ("k", 10)):
        if n >= 1 << shift and not n % (1 << shift):
            return f"{n >> shift}{unit}"
    return str(n)


@dataclass(frozen=True)
class WhatIfRow:
    """A trace's cost on one geometry. l2_cache_bytes: the L2 cache that holds every L2 entry of
    the disk (QEMU's l2-cache-size for a fully cached image: clusters x entry size);
    metadata_bytes_after: the file's bytes that hold metadata after the trace (header, L1,
    refcount table and blocks, L2 tables)."""

    geometry: Geometry
    cost: TraceCost
    l2_cache_bytes: int
    metadata_bytes_after: int
    policy: str = QEMU

    @property
    def label(self) -> str:
        return self.geometry.label + (" minimal-COW (not QEMU)" if self.policy != QEMU else "")

    def to_json(self) -> dict:
        g = self.geometry
        return {"cluster-size": g.cluster_size, "extended-l2": g.extended_l2, "refcount-bits": g.refcount_bits,
                "policy": self.policy,
                **self.cost.to_json(), "l2-cache-bytes": self.l2_cache_bytes,
                "metadata-overhead-bytes": self.metadata_bytes_after,
                "metadata-overhead": round(self.metadata_bytes_after / self.cost.total.file_size_after, 6)
                if self.cost.total.file_size_after else None}


def whatif_row(trace: str, size: int, geometry: Geometry, backing: str | None = None,
               backing_format: str | None = None, policy: str = QEMU, strict: bool = False) -> WhatIfRow:
    """Plan `trace` (a file of qemu-io commands) against a fresh image of `geometry`."""
    folder = tempfile.mkdtemp(prefix="qdebug-whatif-")
    try:
        image = os.path.join(folder, "whatif.qcow2")
        if backing is not None:
            backing = os.path.abspath(backing)
        create_image(image, size, cluster_size=geometry.cluster_size, extended_l2=geometry.extended_l2,
                     refcount_bits=geometry.refcount_bits, backing=backing, backing_format=backing_format)
        fresh_metadata = os.path.getsize(image)  # a fresh image is only metadata
        with open(trace, encoding="utf-8", errors="surrogateescape", newline="\n") as lines:
            cost = trace_cost(image, lines, trace, policy=policy, strict=strict)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cs = geometry.cluster_size
    t = cost.total
    entries = -(-size // cs)
    meta = fresh_metadata + (t.l2_tables_allocated + t.refcount_blocks_allocated) * cs
    return WhatIfRow(geometry, cost, entries * (16 if geometry.extended_l2 else 8), meta, policy)


def _row_job(args: tuple) -> tuple:
    """A worker's row as plain values: the compiled engine's frozen classes do not unpickle."""
    r = whatif_row(*args)
    c = r.cost
    return (r.geometry, astuple(c.total), c.commands, c.failed, c.errors, r.l2_cache_bytes, r.metadata_bytes_after,
            r.policy)


def _row(plain: tuple) -> WhatIfRow:
    geometry, total, commands, failed, errors, l2_cache, meta, policy = plain
    return WhatIfRow(geometry, TraceCost(StepCost(*total), commands, failed, errors), l2_cache, meta, policy)


def whatif(trace: str, size: int, geometries: list[Geometry], backing: str | None = None,
           backing_format: str | None = None, jobs: int = 1, policies: tuple[str, ...] = (QEMU,),
           strict: bool = False) -> list[WhatIfRow]:
    """One row per geometry and policy (each geometry's policies side by side), in the order given;
    `jobs` processes plan them side by side. The minimal-COW policy only changes anything with
    extended L2 (without subclusters it is QEMU's), so it gets rows only there."""
    tasks = [(trace, size, g, backing, backing_format, p, strict) for g in geometries for p in policies
             if p == QEMU or g.extended_l2]
    if jobs <= 1 or len(tasks) <= 1:
        return [whatif_row(*t) for t in tasks]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
        return [_row(r) for r in pool.map(_row_job, tasks)]


@dataclass(frozen=True)
class Recommendation:
    row: WhatIfRow
    reason: str


def recommend(rows: list[WhatIfRow]) -> Recommendation | None:
    """The geometry that writes the fewest host bytes for the trace (data, COW and metadata), the
    smaller file breaking near-ties (within 1%); None when the trace writes nothing."""
    live = [r for r in rows if r.cost.total.host_bytes and r.policy == QEMU]
    if not live:
        return None
    least = min(r.cost.total.host_bytes for r in live)
    near = [r for r in live if r.cost.total.host_bytes <= least * 1.01]
    best = min(near, key=lambda r: (r.cost.total.file_size_after, r.cost.total.host_bytes))
    t = best.cost.total
    others = [r for r in live if r is not best]
    parts = [f"it writes the fewest host bytes ({t.host_bytes:,}"
             + (f", {t.write_amplification:.2f}x the guest's" if t.write_amplification is not None else "") + ")"]
    if t.cow_bytes or any(r.cost.total.cow_bytes for r in others):
        parts.append(f"COW {t.cow_bytes:,} bytes")
    parts.append(f"file {t.file_size_after:,} bytes")
    if others:
        worst = max(others, key=lambda r: r.cost.total.host_bytes)
        w = worst.cost.total.host_bytes
        parts.append(f"{worst.label} writes {w / t.host_bytes:.2f}x as much")
    return Recommendation(best, "; ".join(parts))
