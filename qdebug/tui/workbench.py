"""The app's engine side, without Textual: the open chain, a lazily opened `Replay`, one undo stack.

Steps (Replay.step) and repairs (apply_repair) both land in the replay's journal, in the order
the user made them. `undo()` always takes back the newest, whichever it is, so the journal and the
replay's record list never disagree. Read-only until something needs to write; then the Replay
opens a scratch copy (or the image itself with `write=True`). Every method here runs engine work:
the app calls them from its engine jobs, never on the UI thread.

A trace is opened whole even when some line cannot be replayed (a line qemu-io rejects, or one
qdebug does not reproduce): those lines are kept as `TraceLine`s with their problem, and the
session's commands stop before the first of them (what comes after it would run on an image
QEMU would not have). Steps and repairs on a scratch copy are unsaved work until `save_as`
copies the scratch copy to a new image.
"""

from __future__ import annotations

import operator
import os
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


@dataclass(frozen=True)
class TraceLine:
    """A line of the trace as the timeline lists it: a command, or a line that cannot be replayed."""

    lineno: int
    text: str
    command: Command | None
    problem: str | None = None  # why the line cannot be replayed (qemu-io's message, or Unsupported's)


def read_trace(path: str) -> tuple[list[Command], list[TraceLine]]:
    """Every line of a trace file: the commands the session can run (those before the first line
    that cannot be replayed) and the listing, with each such line and its problem."""
    from ..trace.commands import check_trace, parse_trace

    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise QcowError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise QcowError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    _count, problems = check_trace(lines, path)
    bad = {n: str(p) for n, p in problems}
    commands = parse_trace(["" if n in bad else line for n, line in enumerate(lines, 1)], path)
    listing = [TraceLine(c.lineno, c.source_text, c) for c in commands]
    listing += [TraceLine(n, lines[n - 1].strip(), None, reason) for n, reason in bad.items()]
    listing.sort(key=lambda t: t.lineno)
    first_bad = min(bad, default=None)
    runnable = [c for c in commands if first_bad is None or c.lineno < first_bad]
    return runnable, listing


class Workbench:
    def __init__(self, image: str, *, write: bool = False, commands: list[Command] | None = None,
                 trace_path: str | None = None):
        self.image_path = image
        self.write = write
        self.commands: list[Command] = list(commands or [])
        self.listing: list[TraceLine] = [TraceLine(c.lineno, c.source_text, c) for c in self.commands]
        self.trace_path = trace_path
        self.replay: Replay | None = None
        self.chain: Chain = open_chain(image)
        self.actions: list[Action] = []
        self.generation = 0  # bumped by every change of the image's bytes (results computed before are stale)
        self._saved: list[Action] | None = None  # the actions as they were at the last save
        self.saved_path: str | None = None

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

    def load_trace(self, path: str) -> list[TraceLine]:
        """Open a trace (see read_trace); returns the lines that cannot be replayed."""
        if self.replay is not None and self.actions:
            raise QcowError("undo every step and repair (p) before opening another trace")
        commands, listing = read_trace(path)
        if self.replay is not None:
            self.replay.commands = list(commands)
        self.commands = commands
        self.listing = listing
        self.trace_path = path
        return [t for t in listing if t.problem]

    @property
    def blocked_at(self) -> TraceLine | None:
        """The first line that cannot be replayed (the session stops before it), if any."""
        return next((t for t in self.listing if t.problem), None)

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
            self.generation += rec.changes_image
        return rec

    def undo(self) -> Action | None:
        """Take back the newest step or repair."""
        if not self.actions:
            return None
        act = self.actions.pop()
        assert self.replay is not None and self.replay.journal is not None
        if isinstance(act, StepAction):
            self.replay.back()
            self.generation += act.record.changes_image
        else:
            self.replay.journal.undo(1)
            self.generation += 1
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

    # ---- unsaved work ------------------------------------------------------------------------
    @property
    def unsaved_changes(self) -> int:
        """Changes (steps that wrote, repairs) the scratch copy holds and no saved image has: 0 with
        --write (the image itself changes), after every change was undone, or right after a save."""
        if self.write or self.replay is None:
            return 0
        saved = self._saved
        if saved is not None and len(saved) == len(self.actions) and all(map(operator.is_, saved, self.actions)):
            return 0
        return sum(1 for a in self.actions if isinstance(a, RepairAction) or a.record.changes_image)

    def default_save_path(self) -> str:
        """IMAGE.repaired.qcow2 beside the image (-2, -3... when that exists)."""
        stem, ext = os.path.splitext(self.image_path)
        ext = ext or ".qcow2"
        path, n = f"{stem}.repaired{ext}", 2
        while os.path.lexists(path):
            path, n = f"{stem}.repaired-{n}{ext}", n + 1
        return path

    def check_save_path(self, dest: str) -> str:
        """`dest` as an absolute path if a copy may be saved there (file-system checks only; the UI
        asks before it starts the copy), else QcowError saying why."""
        from ..engine.file.chain import resolve_backing_path

        if self.replay is None or self.write:
            raise QcowError("nothing to save: the session writes " + ("the image itself" if self.write
                                                                    else "nothing yet"))
        dest = os.path.abspath(os.path.expanduser(dest))
        folder = os.path.dirname(dest)
        if os.path.lexists(dest):
            raise QcowError(f"{dest}: exists (saving never overwrites a file: choose another name)")
        if not os.path.isdir(folder):
            raise QcowError(f"{folder}: no such directory")
        backing = self.chain.top.header.backing_file
        if backing and not os.path.isabs(backing):
            here = resolve_backing_path(self.image_path, backing)
            there = resolve_backing_path(dest, backing)
            if os.path.realpath(here) != os.path.realpath(there):
                raise QcowError(f"the backing file name {backing!r} is relative to the image's directory: save the "
                                f"copy in {os.path.dirname(os.path.abspath(self.image_path))}")
        return dest

    def save_as(self, dest: str) -> str:
        """Copy the scratch copy (the image with every step and repair) to a new image `dest`;
        returns its absolute path. Never overwrites a file (see check_save_path)."""
        from ..trace.replay import sparse_copy

        dest = self.check_save_path(dest)
        top = self.chain.top
        folder = os.path.dirname(dest)
        tmp = os.path.join(folder, f".{os.path.basename(dest)}.qdebug-{os.getpid()}.tmp")
        try:
            sparse_copy(top.path, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, dest)  # never replaces a file that appeared meanwhile
        except FileExistsError:
            raise QcowError(f"{dest}: exists (saving never overwrites a file: choose another name)") from None
        except OSError as e:
            raise QcowError(f"{dest}: {e.strerror}") from None
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        self._saved = list(self.actions)
        self.saved_path = dest
        return dest

    @staticmethod
    def entry_findings(report: CheckReport, l1_index: int, l2_index: int) -> list[Finding]:
        """The active image's findings about one L2 entry (what `r` on a cluster repairs)."""
        return [f for f in report.findings if (f.l1_index, f.l2_index) == (l1_index, l2_index) and f.snapshot is None]

    def apply_repair(self, plan: RepairPlan) -> None:
        from ..engine.check.repair import apply_repair

        self.ensure_replay()
        assert self.replay is not None
        self.generation += 1  # (also when apply_repair fails half-way: look again)
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
