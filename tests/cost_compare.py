"""qdebug's step costs (a dry run) beside QEMU's own accounting (tests/qemu_costs.py), field by field."""

from __future__ import annotations

import shutil

from qdebug.engine.write.cost import StepCost
from qdebug.engine.write.step import StepRecord
from qdebug.trace.commands import parse_trace
from qdebug.trace.replay import Replay, ReplayMode
from tests.qemu_costs import Cost, qemu_costs

FIELDS = ("guest_write_bytes", "guest_zero_bytes", "guest_discard_bytes", "host_data_bytes", "cow_bytes",
          "zero_fill_bytes", "allocated_clusters", "l2_tables_allocated", "refcount_blocks_allocated",
          "file_size_before", "file_size_after")


def qdebug_steps(image: str, commands: list[str]) -> list[StepRecord]:
    """Each command's step in a dry run of the trace (the image is not written)."""
    with Replay(image, mode=ReplayMode.DRY_RUN) as r:
        return [r.step(cmd) for cmd in parse_trace(commands, "t")]  # type: ignore[misc]


def qdebug_costs(image: str, commands: list[str]) -> list[StepCost]:
    return [rec.cost for rec in qdebug_steps(image, commands)]


def parallel_pieces(rec: StepRecord) -> bool:
    """The step wrote several host-contiguous pieces that each link L2 entries: QEMU runs them as
    parallel tasks, and the order they finish in decides how often a shared L2 slice or refcount
    block goes out (qdebug counts them in request order)."""
    return sum(1 for r in rec.trace.requests if r[5]) > 1


def comparable(c: StepCost | Cost) -> dict:
    """The fields both sides measure (zeros read from nowhere have no QEMU event)."""
    out = {f: getattr(c, f) for f in FIELDS}
    reads = dict(c.cow_read_bytes) if isinstance(c, StepCost) else c.cow_read_bytes
    out["cow_read_bytes"] = {k: v for k, v in reads.items() if k != "zeros" and v}
    meta = dict(c.metadata)
    out["metadata"] = {k: v for k, v in meta.items() if v}
    return out


def differences(image: str, commands: list[str], chain=()) -> list[str]:
    """Run qdebug on a copy of `image` first, then QEMU's oracle on `image`; every step whose fields
    differ (metadata bytes not compared where QEMU's parallel tasks decide them: parallel_pieces)."""
    copy = image + ".qdebug"
    shutil.copyfile(image, copy)
    steps = qdebug_steps(copy, commands)
    theirs = qemu_costs(image, commands, list(chain))
    out = []
    for i, (rec, b) in enumerate(zip(steps, theirs)):
        ca, cb = comparable(rec.cost), comparable(b)
        if parallel_pieces(rec):
            del ca["metadata"], cb["metadata"]
        if ca != cb:
            diff = {k: (ca[k], cb[k]) for k in ca if ca[k] != cb[k]}
            out.append(f"step {i} {commands[i]!r}: qdebug vs QEMU {diff}")
    return out
