"""`Replay`: the one object that runs qemu-io commands against an image, for the CLI and the TUI.

It opens the chain (the image itself, or a sparse scratch copy whose backing files are only
read), takes QEMU's image locks, keeps the undo journal by its mode's policy, runs each command
through the write engine and yields `StepRecord`s; the CLI prints them, the TUI draws them.

- JOURNALED: each command is one journal step (write-through), so `back()` puts every byte of
  the file back and the engine's allocator state too, and stepping forward again picks the same
  host offsets QEMU would. The TUI and `replay --journal` run this way; the journal is durable
  (fsynced before the image changes) on the user's own image, not on a throw-away scratch copy.
- WRITE_BACK: QEMU's writeback cache. Guest data is written at once, metadata is held back and
  written at each `flush` command, when WRITEBACK_LIMIT bytes are held back or a window's journal
  passes WINDOW_JOURNAL_LIMIT, and at the end. Each such window is one journal step: a crash rolls
  the image back to the last flush. No per-command undo.
- DRY_RUN: each command is planned on top of what the earlier ones would have written; the image
  is opened read-only under a reader's lock and never written.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from enum import Enum
from typing import Sequence

from ..engine.errors import QcowError, StorageError
from ..engine.file.chain import Chain, open_chain
from ..engine.file.fileio import ftruncate, pwrite_all, reserve
from ..engine.file.image import open_image
from ..engine.file.journal import Journal, JournalUnavailable, journal_path, journal_steps
from ..engine.file.locking import ImageLock, check_chain_writable, lock_chain, release_all
from ..engine.write.ops import Command
from ..engine.write.plan import WritePlan
from ..engine.write.step import StepRecord, StepTrace
from ..engine.write.txn import PAGE, WriteMode
from ..engine.write.writer import WriteEngine

WRITEBACK_LIMIT = 32 << 20  # metadata held back before a flush (QEMU's default L2 cache is 32 MiB)
# before-images of overwritten data one window may journal (a trace of in-place rewrites holds no
# metadata back, but each first overwrite of a byte in a window is journaled)
WINDOW_JOURNAL_LIMIT = 256 << 20


class ReplayMode(Enum):
    JOURNALED = "journaled"
    WRITE_BACK = "write-back"
    DRY_RUN = "dry-run"


_ENGINE_MODE = {ReplayMode.JOURNALED: WriteMode.EXECUTE, ReplayMode.WRITE_BACK: WriteMode.WRITE_BACK,
                ReplayMode.DRY_RUN: WriteMode.SIMULATE}


class Replay:
    """Run commands on `image_path` (or on a scratch copy of it) in one `ReplayMode`.

    `commands` is the trace a session steps through (`step()` without an argument runs the next
    one; `back()` and `seek()` move in it); a streaming replay passes each command to `step(cmd)`
    instead. `notes` collects what the user should be told (a rolled-back unfinished step...).
    `durable` (JOURNALED) defaults to: on the user's image yes, on a scratch copy no. Without
    `history` (a long command-line replay) no records are kept: undo is `qdebug undo`'s job;
    without `timing` steps are not timed. `force_share` (a dry run only) shares everything, as qemu-img -U.
    """

    def __init__(self, image_path: str, commands: Sequence[Command] = (), *, mode: ReplayMode = ReplayMode.JOURNALED,
                 scratch: bool = False, durable: bool | None = None, source: str = "<trace>", history: bool = True,
                 timing: bool = True, force_share: bool = False):
        self.image_path = image_path
        self.commands = list(commands)
        self.mode = mode
        self.source = source
        self.records: list[StepRecord] = []  # the steps back() can take back (JOURNALED with history)
        self.history = history
        self.timing = timing  # measure each step's duration (StepRecord.seconds)
        self.notes: list[str] = []
        self.scratch_dir: str | None = None
        self.journal: Journal | None = None
        self.chain: Chain | None = None
        self._locks: list[ImageLock] = []
        self.steps_run = 0
        if force_share and mode is not ReplayMode.DRY_RUN:
            raise QcowError("force share (-U) only goes with a dry run: a replay that writes takes the write lock")
        try:
            if mode is ReplayMode.DRY_RUN:
                self.chain = open_chain(image_path)
                # (-U: "consistent read" held only; the caller said the results may be transient)
                self._locks = lock_chain(self.chain, write=False, force_share=force_share)
            else:
                self.chain = self._open_writable(image_path, scratch)
                self._locks = lock_chain(self.chain, write=True)
                check_chain_writable(self.chain)
                self.journal = self._open_journal(scratch, durable)
            self.engine = WriteEngine(self.chain, _ENGINE_MODE[self.mode])
            if self.mode is ReplayMode.WRITE_BACK:
                # room on disk for each window's flush is taken as commands hold metadata back, so
                # on a full disk a command fails (as in QEMU) and never the flush of finished ones
                self._image_room = True
                self.engine.on_held_back = self._take_room
                if self.journal is not None:
                    self.journal.reserving = True
                self._begin_window()
        except BaseException:
            self.close()
            raise

    # ---- opening ---------------------------------------------------------------------------------
    def _open_writable(self, image_path: str, scratch: bool) -> Chain:
        if not scratch:
            return open_chain(image_path, writable=True)
        # The chain below the top is the user's (read-only); the top is a private sparse copy.
        orig = open_chain(image_path)
        try:
            with ImageLock(orig.top, write=False):  # nobody writes it while we copy
                self.scratch_dir = tempfile.mkdtemp(prefix="qdebug-session-")
                self.scratch_path = os.path.join(self.scratch_dir, os.path.basename(image_path))
                sparse_copy(image_path, self.scratch_path)
            top = open_image(self.scratch_path, writable=True)
        except BaseException:
            orig.close()
            raise
        orig.top.close()
        return Chain([top, *orig.layers[1:]], list(orig.warnings))

    def _open_journal(self, scratch: bool, durable: bool | None) -> Journal | None:
        top = self.chain.top  # type: ignore[union-attr]
        if self.mode is ReplayMode.JOURNALED:
            # The user's own image gets the crash-safe journal; a throw-away scratch copy need not.
            try:
                journal = Journal(top, durable=not scratch if durable is None else durable)
            except JournalUnavailable as e:
                raise JournalUnavailable(f"{e} (undoable steps need it; a replay without --journal does not)",
                                         e.errno) from None
        else:
            earlier = any(s.committed for s in journal_steps(top.path))
            if earlier:
                # Steps an earlier run journaled stay undoable only if this replay is journaled too.
                self.notes.append(f"{self.image_path} has an undo journal; journaling this replay too")
                self.mode = ReplayMode.JOURNALED
                journal = Journal(top, durable=False, keep=True)
            else:
                try:
                    journal = Journal(top, durable=False, keep=False)
                except JournalUnavailable as e:
                    if os.path.lexists(journal_path(top.path)):
                        raise  # a journal there may hold a step to roll back: never go on without it
                    # Only crash safety needs it here (a directory that refuses new files, a full
                    # disk): replay as QEMU does, whose writeback cache has no journal either.
                    self.notes.append(f"{e}; replaying without it: a crash (kill -9, power loss) in the middle "
                                      "may leave leaked clusters, as after a crashed QEMU")
                    return None
        if journal.recovered:
            self.notes.append(f"{self.image_path}: rolled back a step an earlier run left unfinished")
        return journal

    def _begin_window(self) -> None:
        """A write-back window's journal step: it starts before the command it names."""
        index = self.steps_run
        self._window_line: int | None = None  # the window's first command's line
        if self.journal is not None:
            self.journal.begin({"index": index,
                                "command": f"replay {self.source}: commands from #{index} until the next flush"})

    def _take_room(self, pages: list[int]) -> None:
        """Disk room for the later flush of `pages` (held back by the step just run): in the image
        (fallocate, the length unchanged) and in the journal. Raising fails the step."""
        if not pages:
            return
        img = self.chain.top  # type: ignore[union-attr]
        if self._image_room:
            pages.sort()
            i = 0
            while i < len(pages) and self._image_room:
                j = i + 1
                while j < len(pages) and pages[j] == pages[j - 1] + PAGE:
                    j += 1
                self._image_room = reserve(img.fd, pages[i], (j - i) * PAGE, img.path, "for held-back metadata")
                i = j
        if self.journal is not None:
            self.journal.reserve_pages(len(pages))

    def _failed(self, cmd: Command, index: int, error: StorageError, state) -> StepRecord:
        """The record of a command the operating system failed (a full disk...), as qemu-io reports
        it ("write failed: No space left on device"); the step was taken back."""
        top = self.chain.top  # type: ignore[union-attr]
        trace = StepTrace(cmd, top.geometry.ext, [], top.file_size)
        trace.error = f"{cmd.failure_name} failed: {error.strerror}"
        trace.notes.append(str(error))
        trace.after = {}
        return StepRecord(index, cmd, trace, state)

    # ---- where the session is --------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The file being written (the scratch copy, or the image itself)."""
        return self.chain.top.path  # type: ignore[union-attr]

    @property
    def position(self) -> int:
        return len(self.records)

    @property
    def at_end(self) -> bool:
        return self.position >= len(self.commands)

    @property
    def last(self) -> StepRecord | None:
        return self.records[-1] if self.records else None

    def preview(self, cmd: Command | None = None) -> WritePlan | None:
        """What `cmd` (default: the next command of the trace) would do now; nothing changes.
        None at the end of the trace and for commands that do not change the image."""
        if cmd is None:
            if self.at_end:
                return None
            cmd = self.commands[self.position]
        if not cmd.changes_image:
            return None
        return self.engine.plan(cmd)

    # ---- moving ----------------------------------------------------------------------------------
    def step(self, cmd: Command | None = None) -> StepRecord | None:
        """Run `cmd`, or the next command of the trace (None at its end). A step that raises (a
        bug, an unreadable table) is taken back: the image is as before it."""
        if cmd is None:
            if self.at_end:
                return None
            cmd = self.commands[self.position]
        if self.mode is ReplayMode.JOURNALED:
            return self._journaled_step(cmd)
        # dry run / write-back: the engine takes a broken step back out of its overlay itself
        t0 = time.perf_counter() if self.timing else 0.0
        state = self.engine.state
        try:
            rec = self.engine.run(cmd, self.steps_run)
        except StorageError as e:
            rec = self._failed(cmd, self.steps_run, e, state)
        if self.timing:
            rec.seconds = time.perf_counter() - t0
        self.steps_run += 1
        if self.mode is ReplayMode.WRITE_BACK:
            if self._window_line is None:
                self._window_line = cmd.lineno
            if (cmd.flushes or self.engine.dirty_bytes > WRITEBACK_LIMIT
                    or (self.journal is not None and self.journal.step_bytes > WINDOW_JOURNAL_LIMIT)):
                self._end_window()
                self._begin_window()
        return rec

    def _journaled_step(self, cmd: Command) -> StepRecord:
        """One command as one journal step (reads and flushes change nothing: no step)."""
        index = self.steps_run
        t0 = time.perf_counter() if self.timing else 0.0
        journal = self.journal if cmd.changes_image else None
        number = journal.begin({"index": index, "line": cmd.lineno, "command": cmd.source_text}) if journal else None
        state = self.engine.state
        try:
            rec = self.engine.run(cmd, index)
            if journal is not None:
                journal.commit()
        except BaseException as e:
            if journal is not None and journal.in_step:
                journal.abort()  # (if even that fails, its error says so and the replay stops)
            self.engine.restore_state(state)
            if not isinstance(e, StorageError):
                raise
            rec, number = self._failed(cmd, index, e, state), None
        rec.journal_step = number
        if self.timing:
            rec.seconds = time.perf_counter() - t0
        self.steps_run += 1
        if self.history:
            self.records.append(rec)
        return rec

    def back(self) -> StepRecord | None:
        """Undo the newest step: the file's bytes and the allocator state; returns the undone record."""
        if not self.records:
            return None
        if self.journal is None or self.mode is not ReplayMode.JOURNALED:
            raise QcowError(f"a {self.mode.value} replay has no per-step undo journal: cannot step back")
        rec = self.records[-1]
        if rec.journal_step is not None:
            self.journal.undo(1)
        self.engine.restore_state(rec.state_before)  # type: ignore[arg-type]
        self.records.pop()
        self.steps_run -= 1
        return rec

    def seek(self, n: int) -> int:
        """Go to position n (0 = before the first command), stepping forward or back."""
        n = max(0, min(n, len(self.commands)))
        while self.position < n:
            self.step()
        while self.position > n:
            self.back()
        return self.position

    # ---- ending ----------------------------------------------------------------------------------
    def _end_window(self) -> None:
        """Write the held-back metadata and close the window's journal step; if that fails, the
        window is rolled back as a whole (the image as at the previous flush)."""
        journal = self.journal
        if journal is None:  # (no journal could be made: nothing to roll back; QEMU's flush order
            try:             # leaves at most leaked clusters when a flush is cut short)
                self.engine.flush()
            except QcowError as e:
                self.engine.abandon()
                raise QcowError(f"{self.image_path}: writing back the metadata held back since line "
                                f"{self._window_line} failed ({e}); without an undo journal it cannot be rolled "
                                "back: `qemu-img check` says what it left") from None
            return
        journal.reserved = 0  # the flush uses the room its window kept
        try:
            self.engine.flush()
            journal.commit()
        except BaseException as e:
            self.engine.abandon()  # no write may land after the rollback
            journal.abort()
            if not isinstance(e, QcowError) or self._window_line is None:
                raise
            raise QcowError(f"{self.image_path}: writing back the metadata held back since line {self._window_line} "
                            f"failed ({e}); the image was rolled back to its state before that line") from None

    def close(self) -> None:
        """Finish: a write-back replay keeps every step that finished (a step that broke took
        itself back out); the journal stays beside the image only when it holds undo steps."""
        try:
            if self.mode is ReplayMode.WRITE_BACK and getattr(self, "engine", None) is not None and (
                    self.journal is None or self.journal.in_step):
                self._end_window()
        finally:
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            release_all(self._locks)
            self._locks = []
            if self.chain is not None:
                self.chain.close()
                self.chain = None
            if self.scratch_dir:
                shutil.rmtree(self.scratch_dir, ignore_errors=True)
                self.scratch_dir = None

    def __enter__(self) -> "Replay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_gc() -> None:
    """For a long replay: a step makes a few hundred short-lived objects and no lasting cycles: the collector's
    passes over everything loaded (numpy, the image's tables) were ~5% of a long replay. The
    objects alive now are frozen out of its sight and it runs less often."""
    gc.freeze()
    gc.set_threshold(20000, 50, 1000)


def sparse_copy(src: str, dst: str) -> None:
    """Copy only the data extents of `src` (SEEK_DATA/SEEK_HOLE): a 64 GiB image copies in ms."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            size = os.fstat(sfd).st_size
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError:
                    break  # only a hole is left
                hole = os.lseek(sfd, data, os.SEEK_HOLE)
                _copy_range(sfd, dfd, data, hole - data, dst)
                pos = hole
            ftruncate(dfd, size, dst)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_range(sfd: int, dfd: int, offset: int, length: int, dst: str) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(sfd, dfd, length - done, offset + done, offset + done)
        except OSError:
            n = 0
        if n <= 0:  # no copy_file_range here: plain reads and writes
            buf = os.pread(sfd, min(8 << 20, length - done), offset + done)
            if not buf:
                return
            pwrite_all(dfd, buf, offset + done, dst, "copy")
            n = len(buf)
        done += n
