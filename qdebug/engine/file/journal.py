"""Undo journal: the before-image of every byte a step changes, on disk beside the image.

Why on disk: a replay of a long trace must not hold its undo data in RAM, and a crash in the middle
of a step (power loss, kill, a bug) must leave enough behind to put the image back as it was before
that step. The journal is fed by `Image.write_hooks`, which see every `pwrite`/`truncate` before it
reaches the file: nothing can change the image without being journaled first.

File `IMAGE.qdebug-journal`, append-only, truncated as steps are undone (removed when empty):

    file header   b"QDBGJRNL" u32 version u32 0
    record        header (_REC) | payload | u64 start of this record (lets a reader walk backwards)

    STEP  a step begins: size_before = image length, offset = image mtime (ns), payload = JSON meta
    DATA  before a write: offset, payload = the bytes about to be overwritten
    TRNC  before a shrinking truncate: offset, payload = the bytes about to be cut off
    CMIT  the step is complete: offset = image length after it, payload = image mtime (ns) after it

Every record carries a CRC32 over its header fields and payload, so a torn record at the tail (a
crash while appending) is recognised and ignored: the write it guarded never happened. Undoing a step
applies its records in reverse and truncates to the step's starting length, so each byte gets the
value it had before the step; bytes past the starting length need no before-image at all. Within a
step only the first before-image of a byte matters, so later writes to the same bytes record
nothing. In durable mode each record is fsynced before the image is touched and the image is
fsynced before the commit record is written (the write-ahead rule), so recovery after power loss
is exact too.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import zlib
from array import array
from dataclasses import dataclass, field

from ..errors import QcowError

JOURNAL_SUFFIX = ".qdebug-journal"
_MAGIC = b"QDBGJRNL"
_VERSION = 1
_FILE_HEADER = struct.Struct(">8sII")
# kind, step, offset, payload length, image size before, crc32 (of everything else + payload)
_REC = struct.Struct(">4sIQQQI")
_CRC_PART = struct.Struct(">4sIQQQ")
_FOOT = struct.Struct(">Q")
_U64 = struct.Struct(">Q")
STEP, DATA, TRNC, CMIT = b"STEP", b"DATA", b"TRNC", b"CMIT"
_KINDS = (STEP, DATA, TRNC, CMIT)
_CHUNK = 4 << 20  # before-images are streamed in chunks of this size, never held whole


class JournalError(QcowError):
    """The journal is unreadable or does not belong to the image as it is now."""


def journal_path(image_path: str) -> str:
    return image_path + JOURNAL_SUFFIX


@dataclass(frozen=True)
class Record:
    kind: bytes
    step: int
    offset: int
    length: int
    size_before: int
    crc: int
    start: int  # where the record starts in the journal file

    @property
    def payload_at(self) -> int:
        return self.start + _REC.size

    @property
    def end(self) -> int:
        return self.start + _REC.size + self.length + _FOOT.size


@dataclass
class StepInfo:
    """One step as the journal knows it: where it starts, whether it was committed, its meta."""

    number: int
    start: int
    size_before: int
    committed: bool = False
    size_after: int | None = None
    mtime_before: int = 0  # the image's mtime (ns) before the step: restored when the step is undone
    mtime_after: int | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UndoResult:
    """What `undo` did: printable as JSON by the CLI."""

    image: str
    undone: int  # committed steps rolled back
    interrupted: bool  # an uncommitted (crashed) step was rolled back first
    remaining: int  # committed steps still in the journal
    steps: tuple[dict, ...] = ()  # the meta of each undone step, last first

    def to_json(self) -> dict:
        return {"image": self.image, "undone": self.undone, "interrupted-step-rolled-back": self.interrupted,
                "remaining": self.remaining, "steps": list(self.steps)}


# ---- reading -------------------------------------------------------------------------------------
def _read_record(fd: int, pos: int, file_end: int) -> Record | None:
    """The record at `pos`, or None if it is torn or not a record (the journal ends there)."""
    if pos + _REC.size + _FOOT.size > file_end:
        return None
    kind, step, offset, length, size_before, crc = _REC.unpack(os.pread(fd, _REC.size, pos))
    if kind not in _KINDS:
        return None
    end = pos + _REC.size + length + _FOOT.size
    if end > file_end:
        return None
    (back,) = _FOOT.unpack(os.pread(fd, _FOOT.size, end - _FOOT.size))
    if back != pos:
        return None
    return Record(kind, step, offset, length, size_before, crc, pos)


def _payload_chunks(fd: int, rec: Record):
    pos, left = rec.payload_at, rec.length
    while left:
        n = min(_CHUNK, left)
        buf = os.pread(fd, n, pos)
        if len(buf) != n:
            raise JournalError(f"journal record at {rec.start} is truncated")
        yield pos - rec.payload_at, buf
        pos += n
        left -= n


def _crc_ok(fd: int, rec: Record) -> bool:
    crc = zlib.crc32(_CRC_PART.pack(rec.kind, rec.step, rec.offset, rec.length, rec.size_before))
    for _off, buf in _payload_chunks(fd, rec):
        crc = zlib.crc32(buf, crc)
    return crc == rec.crc


def _scan(fd: int, path: str) -> tuple[list[StepInfo], int]:
    """All steps in the journal and the offset where valid records end (a torn tail starts there)."""
    file_end = os.fstat(fd).st_size
    head = os.pread(fd, _FILE_HEADER.size, 0)
    if len(head) < _FILE_HEADER.size:
        return [], _FILE_HEADER.size if len(head) == 0 else 0
    magic, version, _ = _FILE_HEADER.unpack(head)
    if magic != _MAGIC:
        raise JournalError(f"{path}: not a qdebug journal (bad magic)")
    if version != _VERSION:
        raise JournalError(f"{path}: journal version {version} is not supported (expected {_VERSION})")
    steps: list[StepInfo] = []
    pos = _FILE_HEADER.size
    while True:
        rec = _read_record(fd, pos, file_end)
        if rec is None:
            break
        if rec.kind == STEP:
            if steps and not steps[-1].committed:
                break  # a step began after an unfinished one: only a crash can leave that; stop here
            try:
                meta = json.loads(os.pread(fd, rec.length, rec.payload_at) or b"{}") if _crc_ok(fd, rec) else None
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                break
            steps.append(StepInfo(rec.step, rec.start, rec.size_before, mtime_before=rec.offset, meta=meta))
        elif not steps or steps[-1].committed or rec.step != steps[-1].number:
            break
        elif rec.kind == CMIT:
            if not _crc_ok(fd, rec):
                break
            steps[-1].committed = True
            steps[-1].size_after = rec.offset
            if rec.length == _U64.size:
                steps[-1].mtime_after = _U64.unpack(os.pread(fd, _U64.size, rec.payload_at))[0]
        pos = rec.end
    return steps, pos


def _step_records(fd: int, step: StepInfo, end: int) -> list[Record]:
    """The DATA/TRNC records of one step, in the order they were written."""
    out = []
    pos = step.start
    while pos < end:
        rec = _read_record(fd, pos, end)
        if rec is None:
            break
        if rec.kind in (DATA, TRNC) and rec.step == step.number:
            out.append(rec)
        pos = rec.end
    return out


def _roll_back(jfd: int, img_fd: int, step: StepInfo, end: int, *, tolerate_torn: bool) -> None:
    """Put the image back as it was before `step`: before-images in reverse, then the starting length.

    Within a step only the first before-image of each byte is recorded, and only below the starting
    length, so writing them back in any order and truncating restores every byte exactly.
    """
    records = _step_records(jfd, step, end)
    for i in range(len(records) - 1, -1, -1):
        rec = records[i]
        if not _crc_ok(jfd, rec):
            if tolerate_torn and i == len(records) - 1:
                continue  # torn while being appended: the write it guarded never happened
            raise JournalError(f"journal record at {rec.start} (step {step.number}) fails its checksum")
        for off, buf in _payload_chunks(jfd, rec):
            os.pwrite(img_fd, buf, rec.offset + off)
    if os.fstat(img_fd).st_size != step.size_before:
        os.ftruncate(img_fd, step.size_before)


def _set_mtime(img_fd: int, mtime_ns: int) -> None:
    """Give the image back the mtime it had at the state it was just returned to."""
    if mtime_ns:
        os.utime(img_fd, ns=(os.fstat(img_fd).st_atime_ns, mtime_ns))


def _check_unchanged(steps: list[StepInfo], img_fd: int, image: str) -> None:
    """Refuse a journal whose image was written by someone else after its last step.

    Undoing then would write old bytes over the other writer's changes. The length and the mtime
    recorded at the last commit must both still hold (undo puts the mtime back, so they do).
    """
    if not steps:
        return
    last, st = steps[-1], os.fstat(img_fd)
    if last.size_after != st.st_size or (last.mtime_after is not None and last.mtime_after != st.st_mtime_ns):
        raise JournalError(
            f"{image}: the image changed after its undo journal was written (length {st.st_size}, journal "
            f"expects {last.size_after}, or a newer modification time); refusing to use the journal: "
            f"remove {journal_path(image)} to go on without it")


# ---- the live journal ------------------------------------------------------------------------------
class Journal:
    """Journals every change of one writable `Image` in steps; undoes steps in place.

    `begin(meta)` opens a step, every write of the image inside it is journaled through the image's
    write hook, `commit()` closes it. With `keep=False` a committed step is dropped at once: no undo,
    but a step that fails half-way (or a crash) still leaves the image as it was before the step. A write outside a step is refused: an unjournaled change could
    never be undone. Opening a journal that ends in an interrupted step rolls that step back first.
    """

    def __init__(self, img, *, durable: bool = False, keep: bool = True, path: str | None = None):
        if not img.writable:
            raise QcowError(f"{img.path}: a journal needs the image opened for writing")
        self.img = img
        self.durable = durable
        self.keep = keep  # False: only the open step is kept (a failed step still rolls back), no undo
        self.path = path or journal_path(img.path)
        created = not os.path.exists(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JournalError(f"{self.path}: cannot open the undo journal: {e.strerror}") from None
        try:
            self._load(created)
        except BaseException:
            os.close(self.fd)
            raise
        if not keep and self.starts:
            os.close(self.fd)
            raise JournalError(
                f"{img.path} has an undo journal with {len(self.starts)} step(s): changing the image without "
                f"journaling would make them impossible to undo (journal the changes, or `qdebug undo` first)")
        self._pending = False  # the open step's STEP record is not yet made: nothing reached the file
        self._covered: list[int] = []  # flat sorted [s0, e0, s1, e1, ...] of bytes saved this step
        self._current: StepInfo | None = None
        img.write_hooks.append(self._hook)

    def _load(self, created: bool) -> None:
        steps, end = _scan(self.fd, self.path)
        if os.fstat(self.fd).st_size < _FILE_HEADER.size:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, _FILE_HEADER.pack(_MAGIC, _VERSION, 0), 0)
            end = _FILE_HEADER.size
            if created and self.durable:
                _fsync_dir(self.path)
        self.recovered = False
        if steps and not steps[-1].committed:
            _roll_back(self.fd, self.img.fd, steps[-1], os.fstat(self.fd).st_size, tolerate_torn=True)
            os.fsync(self.img.fd)
            _set_mtime(self.img.fd, steps[-1].mtime_before)
            end = steps.pop().start
            self._after_restore()
            self.recovered = True
        _check_unchanged(steps, self.img.fd, self.img.path)
        os.ftruncate(self.fd, end)
        self.end = end
        self.starts = array("Q", (s.start for s in steps))
        self.sizes = array("Q", (s.size_before for s in steps))
        self.mtimes = array("q", (s.mtime_before for s in steps))
        self.next_number = steps[-1].number + 1 if steps else 1

    @property
    def steps(self) -> int:
        """Committed steps in the journal (earlier runs' included)."""
        return len(self.starts)

    @property
    def in_step(self) -> bool:
        return self._current is not None

    @property
    def step_bytes(self) -> int:
        """How much the open step has journaled so far (before-images, record headers)."""
        return self.end - self._current.start if self._current is not None and not self._pending else 0

    # ---- writing -----------------------------------------------------------------------------
    def _append(self, kind: bytes, offset: int, size_before: int, payload: bytes = b"", *,
                stream: tuple[int, int] | None = None) -> None:
        """Append one record; `stream` = (image offset, length) copies the payload from the image.

        The step's own STEP record waits (`_pending`) until the first record that must reach the
        file before the image changes, and goes out in the same write: one syscall, not two.
        """
        step = self._current.number  # type: ignore[union-attr]
        pending = self._step_record()
        start = self.end
        if stream is not None and stream[1] <= _CHUNK:
            payload, stream = self.img.pread(*stream), None
        n = len(payload) if stream is None else stream[1]
        crc = zlib.crc32(_CRC_PART.pack(kind, step, offset, n, size_before))
        if stream is None:
            crc = zlib.crc32(payload, crc)
            os.pwrite(self.fd, b"".join((pending, _REC.pack(kind, step, offset, n, size_before, crc), payload,
                                         _FOOT.pack(start))), start - len(pending))
        else:  # a big before-image: streamed in chunks, the header (with its CRC) written last
            if pending:
                os.pwrite(self.fd, pending, start - len(pending))
            src, pos = stream[0], start + _REC.size
            for done in range(0, n, _CHUNK):
                chunk = self.img.pread(src + done, min(_CHUNK, n - done))
                crc = zlib.crc32(chunk, crc)
                os.pwrite(self.fd, chunk, pos + done)
            os.pwrite(self.fd, _FOOT.pack(start), pos + n)
            os.pwrite(self.fd, _REC.pack(kind, step, offset, n, size_before, crc), start)
        self.end = start + _REC.size + n + _FOOT.size

    def begin(self, meta: dict | None = None) -> int:
        """Open a step; returns its number. `meta` (JSON-able) says what the step is.

        Nothing is made yet: a step that never touches the image costs no syscall and no JSON.
        """
        if self._current is not None:
            raise QcowError("journal: a step is already open")
        self._current = StepInfo(self.next_number, self.end, self.img.file_size, meta=meta or {})
        self._covered = []
        self._pending = True
        return self._current.number

    def _step_record(self) -> bytes:
        """The open step's STEP record, made at the last moment (the image is still untouched, so its
        mtime is the one before the step); b"" once it is made. Advances `end` past it."""
        if not self._pending:
            return b""
        cur = self._current  # type: ignore[assignment]
        cur.mtime_before = os.fstat(self.img.fd).st_mtime_ns
        payload = json.dumps(cur.meta, separators=(",", ":")).encode()
        crc = zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(STEP, cur.number, cur.mtime_before, len(payload),
                                                           cur.size_before)))
        rec = b"".join((_REC.pack(STEP, cur.number, cur.mtime_before, len(payload), cur.size_before, crc),
                        payload, _FOOT.pack(cur.start)))
        self._pending = False
        self.end = cur.start + len(rec)
        return rec

    def commit(self) -> None:
        """Close the step: from now on it is one unit for undo."""
        cur = self._current
        if cur is None:
            raise QcowError("journal: no step is open")
        if self.durable and not self._pending:
            os.fdatasync(self.img.fd)  # the step's writes are on disk before the journal says so
        if self.keep:
            self._append(CMIT, self.img.file_size, cur.size_before, _U64.pack(os.fstat(self.img.fd).st_mtime_ns))
            self.starts.append(cur.start)
            self.sizes.append(cur.size_before)
            self.mtimes.append(cur.mtime_before)
        elif self._pending:  # nothing reached the file: nothing to take back
            self._pending = False
        elif self.durable:
            self._truncate_to(cur.start)
        else:
            # Not kept: cutting the step's records off is enough. Spoiling the STEP record's kind
            # ends the journal there for any reader (a scan stops at it) and costs less than a
            # truncate; the next step's records overwrite these. Removed with the journal at close.
            os.pwrite(self.fd, b"\0\0\0\0", cur.start)
            self.end = cur.start
        self.next_number = cur.number + 1
        self._current = None
        self._covered = []

    def abort(self) -> None:
        """Roll back the open step (a command failed half-way): the image is as before `begin`."""
        cur = self._current
        if cur is None:
            return
        if self._pending:  # the image was never touched in this step
            self._pending = False
        else:
            _roll_back(self.fd, self.img.fd, cur, self.end, tolerate_torn=False)
            _set_mtime(self.img.fd, cur.mtime_before)
            self._truncate_to(cur.start)
            self._after_restore()
        self._current = None
        self._covered = []

    def _hook(self, offset: int, length: int) -> None:
        cur = self._current
        if cur is None:
            raise QcowError(f"{self.img.path}: write outside a journaled step (offset 0x{offset:x}) refused")
        size = self.img.file_size
        # Bytes at or past the step's starting length need no before-image: undo truncates them away.
        end = min(size, cur.size_before) if length < 0 else min(offset + length, size, cur.size_before)
        pieces = self._uncovered(offset, end) if offset < end else []
        for s, e in pieces:
            self._append(TRNC if length < 0 else DATA, s, size, stream=(s, e - s))
            self._cover(s, e)
        if not pieces:
            if not self._pending:
                return
            # Growth only: the STEP record must still be on file, so that a crash now truncates.
            rec = self._step_record()
            os.pwrite(self.fd, rec, self.end - len(rec))
        if self.durable:
            os.fdatasync(self.fd)

    def _uncovered(self, start: int, end: int) -> list[tuple[int, int]]:
        cov = self._covered
        out = []
        i = bisect.bisect_right(cov, start)
        pos = start
        if i % 2:  # start lies inside a covered interval
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

    def _cover(self, start: int, end: int) -> None:
        cov = self._covered
        i = bisect.bisect_left(cov, start)
        j = bisect.bisect_right(cov, end)
        new = []
        if i % 2 == 0:
            new.append(start)
        if j % 2 == 0:
            new.append(end)
        cov[i:j] = new

    # ---- undo ----------------------------------------------------------------------------------
    def undo(self, steps: int | None = 1) -> int:
        """Roll back the last `steps` committed steps (None: all); returns how many were undone."""
        if self._current is not None:
            raise QcowError("journal: cannot undo while a step is open")
        n = len(self.starts) if steps is None else min(steps, len(self.starts))
        for _ in range(n):
            start = self.starts[-1]
            step = StepInfo(0, start, self.sizes[-1])
            rec = _read_record(self.fd, start, self.end)
            step.number = rec.step if rec else 0
            _roll_back(self.fd, self.img.fd, step, self.end, tolerate_torn=False)
            if self.durable:
                os.fdatasync(self.img.fd)
            self._truncate_to(start)
            self.starts.pop()
            self.sizes.pop()
            _set_mtime(self.img.fd, self.mtimes.pop())
            self.next_number = step.number
        if n:
            self._after_restore()
        return n

    def _truncate_to(self, pos: int) -> None:
        os.ftruncate(self.fd, pos)
        self.end = pos
        if self.durable:
            os.fdatasync(self.fd)

    def _after_restore(self) -> None:
        """The file changed behind the Image's back: map it again and re-read the header."""
        self.img.remap()
        self.img.reload_header()

    def close(self) -> None:
        """Detach from the image; an open step is rolled back; an empty journal is removed."""
        if self.fd < 0:
            return
        try:
            if self._current is not None:
                self.abort()
        finally:
            if self._hook in self.img.write_hooks:
                self.img.write_hooks.remove(self._hook)
            empty = not self.starts
            os.close(self.fd)
            self.fd = -1
            if empty:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_dir(path: str) -> None:
    d = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(d)
    finally:
        os.close(d)


# ---- undo from the command line (no live Image: the image may be mid-step and unparseable) ----------
def undo(image_path: str, steps: int | None = 1, *, lock: bool = True) -> UndoResult:
    """Roll back an interrupted step, if any, then the last `steps` committed steps (None: all)."""
    jpath = journal_path(image_path)
    if not os.path.exists(jpath):
        raise JournalError(f"{image_path}: no undo journal ({jpath} does not exist)")
    try:
        img_fd = os.open(image_path, os.O_RDWR)
    except OSError as e:
        raise QcowError(f"{image_path}: {e.strerror}") from None
    image_lock = None
    try:
        if lock:
            from .locking import ImageLock

            image_lock = ImageLock(img_fd, image_path, write=True)
            image_lock.acquire()
        jfd = os.open(jpath, os.O_RDWR)
        try:
            all_steps, end = _scan(jfd, jpath)
            interrupted = False
            if all_steps and not all_steps[-1].committed:
                _roll_back(jfd, img_fd, all_steps[-1], os.fstat(jfd).st_size, tolerate_torn=True)
                _set_mtime(img_fd, all_steps[-1].mtime_before)
                end = all_steps.pop().start
                interrupted = True
            _check_unchanged(all_steps, img_fd, image_path)
            n = len(all_steps) if steps is None else min(steps, len(all_steps))
            undone = []
            for _ in range(n):
                st = all_steps.pop()
                _roll_back(jfd, img_fd, st, end, tolerate_torn=False)
                _set_mtime(img_fd, st.mtime_before)
                end = st.start
                undone.append(st.meta)
            os.fsync(img_fd)
            os.ftruncate(jfd, end)
            os.fsync(jfd)
        finally:
            os.close(jfd)
        if not all_steps:
            os.unlink(jpath)
        return UndoResult(image_path, n, interrupted, len(all_steps), tuple(undone))
    finally:
        if image_lock is not None:
            image_lock.release()
        os.close(img_fd)


def journal_steps(image_path: str) -> list[StepInfo]:
    """The steps recorded beside `image_path` (empty if there is no journal)."""
    jpath = journal_path(image_path)
    if not os.path.exists(jpath):
        return []
    fd = os.open(jpath, os.O_RDONLY)
    try:
        return _scan(fd, jpath)[0]
    finally:
        os.close(fd)
