"""The app's engine side, without Textual: the open chain, a lazily opened `Replay`, one undo stack.

Steps (Replay.step) and repairs (apply_repair) both land in the replay's journal, in the order
the user made them. `undo()` always takes back the newest, whichever it is, so the journal and the
replay's record list never disagree. Read-only until something needs to write; then the Replay
opens a scratch copy (or the image itself with `write=True`). Every method here runs engine work:
the app calls them from its engine jobs, never on the UI thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from ..engine.check.checker import CheckReport, Finding
from ..engine.check.repair import RepairPlan
from ..engine.errors import QcowError
from ..engine.file.chain import Chain, open_chain
from ..engine.write.ops import Command
from ..engine.write.plan import WritePlan
from ..engine.write.step import StepRecord
from ..trace.replay import Replay, ReplayMode


class Serial:
    """Engine jobs run one at a time in the order they were asked for (n then p is a step then an
    undo, never both at once), whichever worker thread picks each up."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def take(self) -> int:
        with self._cond:
            ticket = self._next
            self._next += 1
            return ticket

    @contextmanager
    def turn(self, ticket: int):
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


@dataclass(frozen=True)
class StepAction:
    """A trace step the user made (undone with Replay.back)."""

    record: StepRecord


@dataclass(frozen=True)
class RepairAction:
    """A repair the user applied (undone with one journal step)."""

    plan: RepairPlan


Action = StepAction | RepairAction


class Workbench:
    def __init__(self, image: str, *, write: bool = False, commands: list[Command] | None = None,
                 trace_path: str | None = None):
        self.image_path = image
        self.write = write
        self.commands: list[Command] = list(commands or [])
        self.trace_path = trace_path
        self.replay: Replay | None = None
        self.chain: Chain = open_chain(image)
        self.actions: list[Action] = []

    # ---- replay ------------------------------------------------------------------------------
    def ensure_replay(self) -> bool:
        """Open the Replay (scratch copy unless write); True if the chain was replaced."""
        if self.replay is not None:
            return False
        replay = Replay(self.image_path, self.commands, mode=ReplayMode.JOURNALED, scratch=not self.write)
        # The read-only chain stays open until the UI has swapped to the new one (close_replaced).
        self.replay = replay
        self.chain = replay.chain  # type: ignore[assignment]
        return True

    def load_trace(self, path: str) -> None:
        from ..trace.commands import parse_trace
        from ..trace.syntax import SyntaxProblem

        try:
            with open(path, encoding="utf-8") as f:
                commands = parse_trace(f, path)
        except OSError as e:
            raise QcowError(f"{path}: {e.strerror}") from None
        except SyntaxProblem as e:
            raise QcowError(str(e)) from None
        if self.replay is not None:
            if self.actions:
                raise QcowError("undo every step and repair (p) before opening another trace")
            self.replay.commands = list(commands)
        self.commands = commands
        self.trace_path = path

    @property
    def scratch_path(self) -> str | None:
        if self.replay is None or self.write:
            return None
        return self.replay.path

    @property
    def position(self) -> int:
        return self.replay.position if self.replay is not None else 0

    @property
    def last_record(self) -> StepRecord | None:
        return self.replay.last if self.replay is not None else None

    def next_plan(self) -> WritePlan | None:
        """The engine's plan of the next command (nothing changes), for a preview before stepping."""
        if self.replay is None:
            return None
        return self.replay.preview()

    # ---- moves -------------------------------------------------------------------------------
    def step(self) -> StepRecord | None:
        self.ensure_replay()
        rec = self.replay.step()  # type: ignore[union-attr]
        if rec is not None:
            self.actions.append(StepAction(rec))
        return rec

    def undo(self) -> Action | None:
        """Take back the newest step or repair."""
        if not self.actions:
            return None
        act = self.actions.pop()
        assert self.replay is not None and self.replay.journal is not None
        if isinstance(act, StepAction):
            self.replay.back()
        else:
            self.replay.journal.undo(1)
        return act

    def seek(self, n: int, progress: Callable[[int, int], None] | None = None) -> int:
        """Step or undo until the replay is at step n (repairs on the way are undone too)."""
        self.ensure_replay()
        n = max(0, min(n, len(self.commands)))
        total = abs(n - self.position) or 1
        done = 0
        while self.position > n:
            self.undo()  # a repair on the way is undone too: the journal is one stack
            done += 1
            if progress:
                progress(done, total)
        while self.position < n:
            if self.step() is None:
                break
            done += 1
            if progress:
                progress(done, total)
        return self.position

    @staticmethod
    def entry_findings(report: CheckReport, l1_index: int, l2_index: int) -> list[Finding]:
        """The active image's findings about one L2 entry (what `r` on a cluster repairs)."""
        return [f for f in report.findings if (f.l1_index, f.l2_index) == (l1_index, l2_index) and f.snapshot is None]

    def apply_repair(self, plan: RepairPlan) -> None:
        from ..engine.check.repair import apply_repair

        self.ensure_replay()
        assert self.replay is not None
        apply_repair(self.chain, plan, journal=self.replay.journal)
        self.actions.append(RepairAction(plan))

    @staticmethod
    def close_replaced(chain: Chain) -> None:
        chain.close()

    def close(self) -> None:
        if self.replay is not None:
            self.replay.close()
            self.replay = None
        else:
            self.chain.close()
