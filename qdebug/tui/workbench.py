"""The app's engine side, without Textual: the open chain, a lazily made Session, and one undo stack.

Steps (Session.step) and repairs (apply_repair) both land in the session's journal, in the order
the user made them. `undo()` always takes back the newest, whichever it is, so the journal and the
Session's record list never disagree. Read-only until something needs to write; then the Session
opens a scratch copy (or the image itself with `write=True`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from ..engine.errors import QcowError
from ..engine.file.chain import open_chain


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
class Action:
    kind: str  # 'step' | 'repair'
    record: object = None  # StepRecord of a step
    plan: object = None  # RepairPlan of a repair


class Workbench:
    def __init__(self, image: str, *, write: bool = False, commands: list | None = None,
                 trace_path: str | None = None):
        self.image_path = image
        self.write = write
        self.commands = list(commands or [])
        self.trace_path = trace_path
        self.session = None
        self.chain = open_chain(image)
        self.actions: list[Action] = []

    # ---- session -------------------------------------------------------------------------
    def ensure_session(self) -> bool:
        """Open the Session (scratch copy unless write); True if the chain was replaced."""
        if self.session is not None:
            return False
        from ..trace.session import Session

        session = Session(self.image_path, self.commands, scratch=not self.write)
        # The read-only chain stays open until the UI has swapped to the new one (close_replaced).
        self.session = session
        self.chain = session.chain
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
        if self.session is not None:
            if self.actions:
                raise QcowError("undo every step and repair (p) before opening another trace")
            self.session.commands = list(commands)
        self.commands = commands
        self.trace_path = path

    @property
    def scratch_path(self) -> str | None:
        if self.session is None or self.write:
            return None
        return self.session.path

    @property
    def position(self) -> int:
        return self.session.position if self.session is not None else 0

    @property
    def last_record(self):
        if self.session is None or not self.session.records:
            return None
        return self.session.records[-1]

    def next_plan(self):
        """The engine's plan of the next command (pure), for a preview before stepping."""
        if self.session is None:
            return None
        return self.session.plan()

    # ---- moves ---------------------------------------------------------------------------
    def step(self):
        self.ensure_session()
        rec = self.session.step()
        if rec is not None:
            self.actions.append(Action("step", record=rec))
        return rec

    def undo(self) -> Action | None:
        """Take back the newest step or repair."""
        if not self.actions:
            return None
        act = self.actions.pop()
        if act.kind == "step":
            self.session.back()
        else:
            self.session.journal.undo(1)
        return act

    def seek(self, n: int, progress: Callable[[int, int], None] | None = None) -> int:
        """Step or undo until the session is at step n (repairs on the way are undone too)."""
        self.ensure_session()
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

    def apply_repair(self, plan) -> None:
        from ..engine.check.repair import apply_repair

        self.ensure_session()
        apply_repair(self.chain, plan, journal=self.session.journal)
        self.actions.append(Action("repair", plan=plan))

    def undo_repair(self) -> Action | None:
        if self.actions and self.actions[-1].kind == "repair":
            return self.undo()
        return None

    @staticmethod
    def close_replaced(chain) -> None:
        chain.close()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        else:
            self.chain.close()
