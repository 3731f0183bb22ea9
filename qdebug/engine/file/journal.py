"""Undo journal: the before-image of every byte a step changes, on disk beside the image.

Why on disk: a replay of a long trace must not hold its undo data in RAM, and a crash in the middle
of a step (power loss, kill, a bug) must leave enough behind to put the image back as it was before
that step. The journal is fed by `Image.write_hooks`, which see every `pwrite`/`truncate`/discard
before it reaches the file: nothing can change the image without being journaled first.

File `IMAGE.qdebug-journal`, append-only, truncated as steps are undone (removed when empty):

    file header   b"QDBGJRNL" u32 version u32 block size, then (version 3) u32 length, u32 CRC32
                  of the image's identity (`incarnation.py`, JSON): which file the steps belong to
    record        kind, step, offset, length, size, payload length, payload CRC32, header CRC32 | payload

    STEP  a step begins: offset = image mtime (ns), size = image length, payload = JSON meta
    BFOR  before a change: the bytes at [offset, +length) about to be overwritten (payload)
    HOLE  the same, where those bytes are a hole of the file (no payload: a hole is punched back)
    WRIT  a change of [offset, +length) is about to happen (size = image length before it);
          payload = the CRC32 of every block it touches as it will be after the change
    TRNC  a truncate to offset is about to happen (size = length before); payload as WRIT for the
          blocks a shrink zeroes
    CMIT  the step is complete: offset = image length after it, payload = image mtime (ns) after it

Each record is complete in the journal (and fsynced, in durable mode) before the image changes:
every write is checked (`fileio`), so a full disk fails the step before the image is touched. A
record whose header or payload fails its CRC, or that runs past the end of the file, is torn: the
change it announces never started, and nothing after it is read.

Undoing a committed step writes its before-images back and truncates to its starting length (only
the first before-image of each byte is saved, and none past the starting length, so the order does
not matter). Committed steps are protected by the image's length and mtime after the last commit: a
different one means someone else wrote the image, and the journal is refused. A journal whose image
was re-created or replaced since (another header, another file, a shorter one: see
`incarnation.py`) is refused as stale, with the fix; a version 2 journal has no identity and gets
the first message only.

A step left unfinished by a crash is rolled back only when the image is provably as the step left
it: every block the step touched, and every block with data past its starting length (the rollback
cuts those off), must equal its state before the step or one of the states the step's writes gave it
(the WRIT checksums), and the image must not have been modified after the step's last journal
record (its mtime). Otherwise another program has written the image since (QEMU on a crashed replay,
say), and rolling back would destroy its writes: the journal refuses, touches nothing, and says what
the choices are.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import struct
import zlib
from array import array
from dataclasses import dataclass, field

import numpy as np

from ..errors import QcowError, StorageError
from .blockcrc import BLOCK, after_crcs, block_crcs
from .fileio import fsync, ftruncate, pwrite_all, reserve, signals_deferred, storage_error, zero_range
from .filemap import data_extents
from .incarnation import Incarnation, incarnation
from .intervals import Intervals

JOURNAL_SUFFIX = ".qdebug-journal"
_MAGIC = b"QDBGJRNL"
_VERSION = 3
_READABLE = (2, 3)  # version 2: the same records, no identity
_FILE_HEADER = struct.Struct(">8sII")
_IDENTITY = struct.Struct(">II")  # length and CRC32 of the identity that follows the file header
_BODY = struct.Struct(">4sIQQQQI")  # kind, step, offset, length, size, payload length, payload CRC
_HDR = struct.Struct(">4sIQQQQII")  # ... and the CRC of everything before it
_U64 = struct.Struct(">Q")
STEP, BFOR, HOLE, WRIT, TRNC, CMIT = b"STEP", b"BFOR", b"HOLE", b"WRIT", b"TRNC", b"CMIT"
_KINDS = (STEP, BFOR, HOLE, WRIT, TRNC, CMIT)
_CHUNK = 4 << 20  # before-images are streamed in chunks of this size, never held whole
GRACE_NS = 2_000_000_000  # an interrupted write lands this soon after its record, or it was not ours
_KEY_MUL = np.uint64(0x9E3779B97F4A7C15)
# Journaling a held-back page later costs at most its before-image, a HOLE/BFOR header on each side
# and its share of a WRIT record (header, checksum); a step adds its STEP and a TRNC record.
_RESERVE_PER_PAGE = 4096 + 4 * 48 + 4
_RESERVE_BASE = 8192
_ROOM_STEP = 256 << 10
_LITTLE = struct.pack("=I", 1) == struct.pack("<I", 1)


class JournalError(QcowError):
    """The journal is unreadable or does not belong to the image as it is now."""


class JournalUnavailable(JournalError):
    """The journal file cannot be created or opened (read-only or immutable directory, full disk)."""

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


def journal_path(image_path: str) -> str:
    return image_path + JOURNAL_SUFFIX


@dataclass(frozen=True)
class Record:
    kind: bytes
    step: int
    offset: int
    length: int
    size: int
    plen: int
    pcrc: int
    start: int  # where the record starts in the journal file

    @property
    def payload_at(self) -> int:
        return self.start + _HDR.size

    @property
    def end(self) -> int:
        return self.start + _HDR.size + self.plen


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
    discarded: int = 0  # --discard-journal: the steps dropped (the image untouched)

    def to_json(self) -> dict:
        return {"image": self.image, "undone": self.undone, "interrupted-step-rolled-back": self.interrupted,
                "remaining": self.remaining, "steps": [undone_step(m) for m in self.steps],
                "discarded": self.discarded}


def undone_step(meta: dict) -> dict:
    """An undone step in `undo --output=json`: one shape whoever wrote it (a replay's command, a
    write-back run's commands up to a flush, a repair), absent values null."""
    command = meta.get("command")
    if command is None and meta.get("op") == "repair":
        command = f"repair (policy {meta.get('policy')}, {meta.get('items')} item(s))"
    return {"journal-step": meta.get("journal-step"), "index": meta.get("index"), "line": meta.get("line"),
            "command": command}


# ---- records --------------------------------------------------------------------------------------
def _pack(kind: bytes, step: int, offset: int, length: int, size: int, payload=b"", pcrc: int | None = None,
          plen: int | None = None) -> bytes:
    """A record header (the payload follows it)."""
    if pcrc is None:
        pcrc = zlib.crc32(payload)
    body = _BODY.pack(kind, step, offset, length, size, len(payload) if plen is None else plen, pcrc)
    return body + struct.pack(">I", zlib.crc32(body))


def _pread(fd: int, n: int, pos: int) -> bytes:
    """Exactly n bytes, or fewer only at the end of the file."""
    out = []
    while n > 0:
        b = os.pread(fd, n, pos)
        if not b:
            break
        out.append(b)
        n -= len(b)
        pos += len(b)
    return b"".join(out)


def _read_record(fd: int, pos: int, file_end: int) -> Record | None:
    """The record at `pos`, or None if it is torn or not a record (the journal ends there)."""
    if pos + _HDR.size > file_end:
        return None
    head = _pread(fd, _HDR.size, pos)
    if len(head) < _HDR.size:
        return None
    kind, step, offset, length, size, plen, pcrc, hcrc = _HDR.unpack(head)
    if kind not in _KINDS or zlib.crc32(head[:_BODY.size]) != hcrc:
        return None
    if pos + _HDR.size + plen > file_end:
        return None
    return Record(kind, step, offset, length, size, plen, pcrc, pos)


def _payload_chunks(fd: int, rec: Record):
    pos, left = rec.payload_at, rec.plen
    while left:
        n = min(_CHUNK, left)
        buf = _pread(fd, n, pos)
        if len(buf) != n:
            raise JournalError(f"journal record at {rec.start} is truncated")
        yield pos - rec.payload_at, buf
        pos += n
        left -= n


def _payload(fd: int, rec: Record) -> bytes | None:
    """The whole payload of a small record, or None if it fails its CRC (torn)."""
    buf = _pread(fd, rec.plen, rec.payload_at)
    return buf if len(buf) == rec.plen and zlib.crc32(buf) == rec.pcrc else None


def _payload_ok(fd: int, rec: Record) -> bool:
    crc = 0
    try:
        for _off, buf in _payload_chunks(fd, rec):
            crc = zlib.crc32(buf, crc)
    except JournalError:
        return False
    return crc == rec.pcrc


def _crcs(fd: int, rec: Record) -> np.ndarray:
    return np.frombuffer(_pread(fd, rec.plen, rec.payload_at), dtype=">u4").astype(np.uint32)


# ---- reading -------------------------------------------------------------------------------------
def _file_header(fd: int, path: str) -> tuple[int, Incarnation | None]:
    """(where the records start, the image identity recorded); (0, None) for a journal whose header
    is not all there (a crash while it was made: it holds no step)."""
    head = _pread(fd, _FILE_HEADER.size, 0)
    if len(head) < _FILE_HEADER.size:
        return 0, None
    magic, version, block = _FILE_HEADER.unpack(head)
    if magic != _MAGIC:
        raise JournalError(f"{path}: not a qdebug journal (bad magic)")
    if version not in _READABLE or block != BLOCK:
        raise JournalError(f"{path}: journal version {version} (block {block}) is not supported "
                           f"(expected {_VERSION}, block {BLOCK}); undo it with the qdebug that wrote it")
    if version == 2:
        return _FILE_HEADER.size, None
    ident = _pread(fd, _IDENTITY.size, _FILE_HEADER.size)
    if len(ident) < _IDENTITY.size:
        return 0, None
    n, crc = _IDENTITY.unpack(ident)
    if n > 1 << 16:  # (an identity is a few hundred bytes: this is damage, never read it)
        return 0, None
    raw = _pread(fd, n, _FILE_HEADER.size + _IDENTITY.size)
    if len(raw) != n or zlib.crc32(raw) != crc:
        return 0, None
    return _FILE_HEADER.size + _IDENTITY.size + n, Incarnation.from_bytes(raw)


def _header_bytes(img_fd: int) -> bytes:
    """A new journal's file header: the image's identity as it is now."""
    raw = incarnation(img_fd).to_bytes()
    return _FILE_HEADER.pack(_MAGIC, _VERSION, BLOCK) + _IDENTITY.pack(len(raw), zlib.crc32(raw)) + raw


def _scan(fd: int, path: str) -> tuple[list[StepInfo], int]:
    """All steps in the journal and the offset where valid records end (a torn tail starts there)."""
    file_end = os.fstat(fd).st_size
    pos, _identity = _file_header(fd, path)
    if not pos:
        return [], 0
    steps: list[StepInfo] = []
    while True:
        rec = _read_record(fd, pos, file_end)
        if rec is None:
            break
        if rec.kind == STEP:
            if steps and not steps[-1].committed:
                break  # a step began after an unfinished one: only a crash can leave that; stop here
            raw = _payload(fd, rec)
            try:
                meta = json.loads(raw or b"{}") if raw is not None else None
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                break
            steps.append(StepInfo(rec.step, rec.start, rec.size, mtime_before=rec.offset, meta=meta))
        elif not steps or steps[-1].committed or rec.step != steps[-1].number:
            break
        elif rec.kind == CMIT:
            raw = _payload(fd, rec)
            if raw is None:
                break
            steps[-1].committed = True
            steps[-1].size_after = rec.offset
            if len(raw) == _U64.size:
                steps[-1].mtime_after = _U64.unpack(raw)[0]
        pos = rec.end
    return steps, pos


def _step_records(fd: int, step: StepInfo, end: int, *, complete: bool) -> list[Record]:
    """The records of one step after its STEP record, in the order they were written.

    A committed (`complete`) step must have every payload intact. An unfinished one may end in a
    torn record (the change it announced never started): it and anything after it are left out,
    but a torn record followed by valid ones is damage, not a crash, and is refused.
    """
    out: list[Record] = []
    first = _read_record(fd, step.start, end)
    pos = first.end if first is not None else end
    torn_at = None
    while pos < end:
        rec = _read_record(fd, pos, end)
        if rec is None or rec.step != step.number or rec.kind in (STEP, CMIT):
            break
        if rec.kind != HOLE and not _payload_ok(fd, rec):
            if complete:
                raise JournalError(f"journal record at {rec.start} (step {step.number}) fails its checksum")
            torn_at = rec.start
        elif torn_at is not None:
            raise JournalError(f"journal record at {torn_at} (step {step.number}) is damaged, yet records follow "
                               "it: the journal cannot be trusted")
        else:
            out.append(rec)
        pos = rec.end
    return out


def _restore(jfd: int, img_fd: int, image: str, step: StepInfo, records: list[Record]) -> None:
    """Put the image back as it was before `step`: before-images (holes punched back), then the
    starting length. Within a step only the first before-image of each byte is recorded, and only
    below the starting length, so the order does not matter and every byte gets its old value."""
    for rec in reversed(records):
        if rec.kind == HOLE:
            zero_range(img_fd, rec.offset, rec.length, image, "restore a hole of")
        elif rec.kind == BFOR:
            for off, buf in _payload_chunks(jfd, rec):
                pwrite_all(img_fd, buf, rec.offset + off, image, "restore")
    if os.fstat(img_fd).st_size != step.size_before:
        ftruncate(img_fd, step.size_before, image, "restore the length of the file")


def _set_mtime(img_fd: int, mtime_ns: int) -> None:
    """Give the image back the mtime it had at the state it was just returned to."""
    if mtime_ns:
        os.utime(img_fd, ns=(os.fstat(img_fd).st_atime_ns, mtime_ns))


def _touch(jfd: int) -> None:
    """The journal's mtime says when qdebug last acted on the image (see `_prove`)."""
    try:
        os.utime(jfd)
    except OSError:
        pass


def _stale(image: str, jpath: str, why: str) -> JournalError:
    return JournalError(
        f"{image}: its undo journal {jpath} belongs to another incarnation of the file: {why}. The image was "
        f"re-created or replaced since qdebug journaled it (qemu-img create, or a copy or a move over it), so "
        f"no step of that journal can be undone into it; the image was not touched. Fix: `qdebug undo "
        f"--discard-journal {image}` drops the stale journal and keeps the image as it is")


def _check_incarnation(steps: list[StepInfo], recorded: Incarnation | None, img_fd: int, image: str,
                       jpath: str) -> None:
    """Refuse, as stale, a journal with steps whose image has another header than the one it was
    written for (see `incarnation.py`)."""
    if not steps or recorded is None:
        return
    changes = recorded.header_changes(incarnation(img_fd))
    if changes:
        raise _stale(image, jpath, "its qcow2 header says " + ", ".join(changes))


def _check_unchanged(steps: list[StepInfo], img_fd: int, image: str, recorded: Incarnation | None = None,
                     jpath: str = "") -> None:
    """Refuse a journal whose image was written by someone else after its last step.

    Undoing then would write old bytes over the other writer's changes. The length and the mtime
    recorded at the last commit must both still hold (undo puts the mtime back, so they do). Where
    they do not, another file (inode) or a shorter one is another incarnation: said so.
    """
    if not steps:
        return
    last, st = steps[-1], os.fstat(img_fd)
    if last.size_after != st.st_size or (last.mtime_after is not None and last.mtime_after != st.st_mtime_ns):
        if recorded is not None and not recorded.same_file(incarnation(img_fd)):
            raise _stale(image, jpath or journal_path(image),
                         f"it is another file (inode {st.st_ino}, the journal's was inode {recorded.inode})")
        if recorded is not None and last.size_after is not None and st.st_size < last.size_after:
            raise _stale(image, jpath or journal_path(image),
                         f"it is {st.st_size} bytes long, shorter than the {last.size_after} bytes qdebug's last "
                         f"journaled step left (no QEMU write shrinks an image file)")
        raise JournalError(
            f"{image}: the image changed after its undo journal was written (length {st.st_size}, journal "
            f"expects {last.size_after}, or a newer modification time); refusing to use the journal: "
            f"`qdebug undo --discard-journal {image}` keeps the image as it is and drops the journal")


# ---- proving that an interrupted step may be rolled back -------------------------------------------
def _keys(blocks: np.ndarray, crcs: np.ndarray) -> np.ndarray:
    """One 64-bit key per (block, CRC) pair (a hash: a false match is as likely as 2**-64)."""
    return blocks.astype(np.uint64) * _KEY_MUL + crcs.astype(np.uint64)


def _read_blocks(fd: int, first: int, count: int) -> bytes:
    """`count` blocks from block `first`, zeros past the end of the file (as the rollback sees them)."""
    buf = _pread(fd, count * BLOCK, first * BLOCK)
    return buf + bytes(count * BLOCK - len(buf))


def _runs(blocks: np.ndarray, limit: int = _CHUNK // BLOCK):
    """(first, count) of each run of consecutive block numbers (sorted, unique), cut at `limit`."""
    if not blocks.size:
        return
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    for run in np.split(blocks, breaks):
        first, n = int(run[0]), len(run)
        for k in range(0, n, limit):
            yield first + k, min(limit, n - k)


def _before_block(jfd: int, b: int, current: bytes, befores: list[Record], size_before: int) -> bytes:
    """Block `b` as it was before the step: what the step never touched is as it is now, what it did
    touch is in its before-images, and nothing existed past the starting length."""
    lo, hi = b * BLOCK, (b + 1) * BLOCK
    out = bytearray(current)
    for rec in befores:
        s, e = max(rec.offset, lo), min(rec.offset + rec.length, hi)
        if s >= e:
            continue
        if rec.kind == HOLE:
            out[s - lo:e - lo] = bytes(e - s)
        else:
            out[s - lo:e - lo] = _pread(jfd, e - s, rec.payload_at + s - rec.offset)
    if size_before < hi:
        cut = max(size_before, lo)
        out[cut - lo:] = bytes(hi - cut)
    return bytes(out)


def _prove(jfd: int, img_fd: int, step: StepInfo, records: list[Record]) -> str | None:
    """None if the image is as the interrupted `step` left it (a rollback destroys nothing of anybody
    else's), else the reason why not."""
    st_img, st_j = os.fstat(img_fd), os.fstat(jfd)
    late = st_img.st_mtime_ns - st_j.st_mtime_ns
    if late > GRACE_NS:
        return (f"it was modified {late / 1e9:.1f} s after the step's last journal record, so not by the "
                "interrupted step")
    after_b, after_c, befores, touched = [], [], [], []
    for rec in records:
        if rec.kind in (WRIT, TRNC) and rec.plen:
            crcs = _crcs(jfd, rec)
            first = rec.offset // BLOCK  # (a shrink's checksums start at the new end's block)
            after_b.append(np.arange(first, first + len(crcs), dtype=np.int64))
            after_c.append(crcs)
        elif rec.kind in (BFOR, HOLE):
            befores.append(rec)
            touched.append(np.arange(rec.offset // BLOCK, (rec.offset + rec.length - 1) // BLOCK + 1, dtype=np.int64))
    touched += after_b
    # the rollback cuts off everything past the starting length: whatever has data there must be ours
    for s, e in data_extents(img_fd, step.size_before, st_img.st_size):
        touched.append(np.arange(s // BLOCK, (e - 1) // BLOCK + 1, dtype=np.int64))
    if not touched:
        return None
    blocks = np.unique(np.concatenate(touched))
    allowed = np.sort(_keys(np.concatenate(after_b), np.concatenate(after_c))) if after_b else np.zeros(0, np.uint64)
    befores.sort(key=lambda r: r.offset)  # (a step saves each byte once: they never overlap)
    starts = [r.offset for r in befores]
    for first, n in _runs(blocks):
        buf = _read_blocks(img_fd, first, n)
        nums = np.arange(first, first + n, dtype=np.int64)
        keys = _keys(nums, np.frombuffer(block_crcs(buf), dtype=np.uint32))
        ok = np.isin(keys, allowed) if allowed.size else np.zeros(n, bool)
        for i in np.flatnonzero(~ok).tolist():
            b = first + i
            cur = buf[i * BLOCK:(i + 1) * BLOCK]
            j = bisect.bisect_left(starts, (b + 1) * BLOCK)
            near = []
            while j > 0 and befores[j - 1].offset + befores[j - 1].length > b * BLOCK:
                j -= 1
                near.append(befores[j])
            if cur != _before_block(jfd, b, cur, near, step.size_before):
                return (f"the bytes at [0x{b * BLOCK:x}, 0x{(b + 1) * BLOCK:x}) are neither as the step found them "
                        "nor as it wrote them")
    return None


def _refusal(image: str, step: StepInfo, reason: str) -> JournalError:
    what = step.meta.get("command") or step.meta.get("op") or ""
    return JournalError(
        f"{image}: an earlier qdebug run was interrupted in the middle of journal step {step.number}"
        f"{f' ({what})' if what else ''}, and the image is no longer as that step left it: {reason}. "
        "Rolling the step back could destroy what another program wrote since, so the image was not touched. "
        f"Choices: keep the image as it is now and drop the journal with `qdebug undo --discard-journal {image}` "
        "(the interrupted step's writes stay: `qemu-img check` tells whether clusters leaked), or leave both "
        "files as they are")


def _recover(jfd: int, jpath: str, img_fd: int, image: str, step: StepInfo) -> None:
    """Roll back the unfinished `step` if provably safe (see `_prove`), else raise the refusal."""
    records = _step_records(jfd, step, os.fstat(jfd).st_size, complete=False)
    reason = _prove(jfd, img_fd, step, records)
    if reason:
        raise _refusal(image, step, reason)
    _touch(jfd)  # the rollback's own writes come after this: a rollback cut short can be proved again
    with signals_deferred():
        try:
            _restore(jfd, img_fd, image, step, records)
            fsync(img_fd, image)
        except BaseException:
            _touch(jfd)
            raise
        _set_mtime(img_fd, step.mtime_before)


# ---- the live journal ------------------------------------------------------------------------------
class Journal:
    """Journals every change of one writable `Image` in steps; undoes steps in place.

    `begin(meta)` opens a step, every write of the image inside it is journaled through the image's
    write hook, `commit()` closes it. With `keep=False` a committed step is dropped at once: no undo,
    but a step that fails half-way (or a crash) still leaves the image as it was before the step. A
    write outside a step is refused: an unjournaled change could never be undone. Opening a journal
    that ends in an interrupted step rolls that step back first (or refuses: see `_prove`).
    """

    def __init__(self, img, *, durable: bool = False, keep: bool = True, path: str | None = None):
        if not img.writable:
            raise QcowError(f"{img.path}: a journal needs the image opened for writing")
        self.img = img
        self.durable = durable
        self.keep = keep  # False: only the open step is kept (a failed step still rolls back), no undo
        self.path = path or journal_path(img.path)
        self.broken: str | None = None  # a rollback failed: the journal stays on disk for `qdebug undo`
        created = not os.path.exists(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JournalUnavailable(f"{self.path}: cannot open the undo journal: {e.strerror}",
                                     e.errno or errno.EIO) from None
        try:
            self._load(created)
        except BaseException:
            os.close(self.fd)
            if created:
                _remove(self.path)
            raise
        if not keep and self.starts:
            os.close(self.fd)
            raise JournalError(
                f"{img.path} has an undo journal with {len(self.starts)} step(s): changing the image without "
                f"journaling would make them impossible to undo (journal the changes, or `qdebug undo` first)")
        self._pending = False  # the open step's STEP record is not yet made: nothing reached the file
        self._covered = Intervals()  # bytes saved this step
        self._records: list[int] = []  # where the open step's records start (its STEP record excluded)
        self._current: StepInfo | None = None
        # Room: with `reserving`, the journal keeps `reserved` bytes of disk space taken past its end
        # (fallocate, the file's length unchanged) for the records the open step still has to make
        # (a write-back window's flush), so that on a full disk a command fails, not the flush.
        self.reserving = False
        self.reserved = 0
        self._room = self.end  # disk space is taken up to here
        img.write_hooks.append(self._hook)

    def _load(self, created: bool) -> None:
        steps, end = _scan(self.fd, self.path)
        recorded = _file_header(self.fd, self.path)[1] if steps else None
        _check_incarnation(steps, recorded, self.img.fd, self.img.path, self.path)
        self.recovered = False
        if steps and not steps[-1].committed:
            _recover(self.fd, self.path, self.img.fd, self.img.path, steps[-1])
            end = steps.pop().start
            self._after_restore()
            self.recovered = True
        _check_unchanged(steps, self.img.fd, self.img.path, recorded, self.path)
        if not steps:  # a journal without steps starts anew, with the image's identity as it is now
            header = _header_bytes(self.img.fd)
            ftruncate(self.fd, 0, self.path)
            pwrite_all(self.fd, header, 0, self.path, "write the journal header")
            end = len(header)
            if created and self.durable:
                _fsync_dir(self.path)
        else:
            ftruncate(self.fd, end, self.path)
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
    def _write(self, data, pos: int) -> None:
        pwrite_all(self.fd, data, pos, self.path, "append to the undo journal")

    def begin(self, meta: dict | None = None) -> int:
        """Open a step; returns its number. `meta` (JSON-able) says what the step is.

        Nothing is made yet: a step that never touches the image costs no syscall and no JSON.
        """
        if self._current is not None:
            raise QcowError("journal: a step is already open")
        if self.broken:
            raise QcowError(self.broken)
        self._current = StepInfo(self.next_number, self.end, self.img.file_size, meta=meta or {})
        self.reserved = 0
        self._covered = Intervals()
        self._records = []
        self._pending = True
        return self._current.number

    def _step_record(self) -> bytes:
        """The open step's STEP record, made at the last moment (the image is still untouched, so its
        mtime is the one before the step); b"" once it is made."""
        if not self._pending:
            return b""
        cur = self._current  # type: ignore[assignment]
        cur.mtime_before = os.fstat(self.img.fd).st_mtime_ns
        payload = json.dumps(cur.meta, separators=(",", ":")).encode()
        return _pack(STEP, cur.number, cur.mtime_before, 0, cur.size_before, payload) + payload

    def _append(self, parts: list[bytes], streams: list[tuple[int, int, int]]) -> None:
        """Append records: `parts` (whole records, written as one) then, for each (image offset,
        length, step) in `streams`, a before-image too big to hold, streamed in chunks with its
        header written last. Nothing counts until it is all on file (`end` moves last)."""
        step_rec = self._step_record()
        pos = self.end
        if step_rec:
            parts = [step_rec, *parts]
        starts = []
        at = pos
        for i, p in enumerate(parts):
            if i or not step_rec:
                starts.append(at)
            at += len(p)
        if self.reserving:
            self._make_room(at + sum(_HDR.size + n for _src, n, _number in streams))
        if parts:
            self._write(b"".join(parts), pos)
        for src, n, number in streams:
            crc = 0
            for done in range(0, n, _CHUNK):
                chunk = self.img.pread(src + done, min(_CHUNK, n - done))
                crc = zlib.crc32(chunk, crc)
                self._write(chunk, at + _HDR.size + done)
            self._write(_pack(BFOR, number, src, n, 0, pcrc=crc, plen=n), at)
            starts.append(at)
            at += _HDR.size + n
        if self.durable:
            fsync(self.fd, self.path, data_only=True)
        if step_rec:
            self._pending = False
        self.end = at
        self._records.extend(starts)

    def _append_one(self, record: bytes) -> None:
        """`_append` of one whole record once the step's STEP record is made (a write-back window's
        usual record: the WRIT of data written past the window's starting length)."""
        pos = self.end
        at = pos + len(record)
        if self.reserving and at + self.reserved > self._room:
            self._make_room(at)
        self._write(record, pos)
        if self.durable:
            fsync(self.fd, self.path, data_only=True)
        self.end = at
        self._records.append(pos)

    # ---- room for what a step has yet to journal -------------------------------------------------
    def reserve_pages(self, pages: int) -> None:
        """Keep room for journaling the later write of `pages` more 4 KiB pages held back (at most
        a before-image each, a record header or two, their checksums). Raises `StorageError` when
        the disk has no room left: the caller fails the command that would need it."""
        if not self.reserving:
            return
        if not self.reserved:  # the STEP record and the flush's truncate record come on top
            self.reserved = _RESERVE_BASE
        self.reserved += pages * _RESERVE_PER_PAGE
        self._make_room(self.end)

    def _make_room(self, upto: int) -> None:
        """Disk space taken for the journal up to `upto` plus the reserve (in steps of _ROOM_STEP
        while the disk has them; just what is needed when it is nearly full)."""
        need = upto + self.reserved
        if need <= self._room:
            return
        room, what = self._room, "for the undo journal"
        try:
            ok, self._room = reserve(self.fd, room, need + _ROOM_STEP - room, self.path, what), need + _ROOM_STEP
        except StorageError:
            ok, self._room = reserve(self.fd, room, need - room, self.path, what), need
        if not ok:
            self._room = 1 << 62  # a file system that cannot: no reserve

    def _before_images(self, start: int, end: int, parts: list[bytes], streams: list) -> None:
        """Records of the bytes [start, end) hold now (not yet saved this step): holes as HOLE."""
        number = self._current.number  # type: ignore[union-attr]
        fd = self.img.fd
        for s, e in self._covered.gaps(start, end):
            pos = s
            for ds, de in _extents_or_all(fd, s, e):
                if ds > pos:
                    parts.append(_pack(HOLE, number, pos, ds - pos, 0))
                if de - ds > _CHUNK:
                    streams.append((ds, de - ds, number))
                else:
                    data = self.img.pread(ds, de - ds)
                    parts.append(_pack(BFOR, number, ds, de - ds, 0, data) + data)
                pos = de
            if pos < e:
                parts.append(_pack(HOLE, number, pos, e - pos, 0))
            self._covered.add(s, e)

    def _after_crcs(self, offset: int, length: int, data) -> bytes:
        """Block checksums of [offset, +length) as `data` (None: zeros) will leave it (big-endian)."""
        crcs = after_crcs(self.img.pread, offset, length, data)
        if _LITTLE:
            crcs.byteswap()
        return crcs.tobytes()

    def _hook(self, offset: int, length: int, data=None) -> None:
        cur = self._current
        if cur is None:
            raise QcowError(f"{self.img.path}: write outside a journaled step (offset 0x{offset:x}) refused")
        size = self.img.file_size
        parts: list[bytes] = []
        streams: list = []
        number = cur.number
        if length < 0:  # a truncate to `offset`
            if offset < size:  # a shrink: the cut bytes below the starting length are saved
                self._before_images(offset, min(size, cur.size_before), parts, streams)
                crcs = self._after_crcs(offset, size - offset, None)
            else:
                crcs = b""
            parts.append(_pack(TRNC, number, offset, 0, size, crcs) + crcs)
        elif length:
            end = min(offset + length, size, cur.size_before)
            if offset < end:
                self._before_images(offset, end, parts, streams)
            crcs = self._after_crcs(offset, length, data)
            if not parts and not self._pending:  # a write past the step's starting length: one record
                self._append_one(_pack(WRIT, number, offset, length, size, crcs) + crcs)
                return
            parts.append(_pack(WRIT, number, offset, length, size, crcs) + crcs)
        else:
            return
        # streamed before-images go first: the WRIT / TRNC record, last, says the change may begin
        if streams:
            self._append(parts[:-1], streams)
            self._append(parts[-1:], [])
        else:
            self._append(parts, [])

    def commit(self) -> None:
        """Close the step: from now on it is one unit for undo."""
        cur = self._current
        if cur is None:
            raise QcowError("journal: no step is open")
        if self.durable and not self._pending:
            fsync(self.img.fd, self.img.path, data_only=True)  # the step's writes are on disk first
        if self.keep:  # (a step that changed nothing is a step too: the caller counts its steps)
            mtime = _U64.pack(os.fstat(self.img.fd).st_mtime_ns)
            self._append([_pack(CMIT, cur.number, self.img.file_size, 0, 0, mtime) + mtime], [])
            self.starts.append(cur.start)
            self.sizes.append(cur.size_before)
            self.mtimes.append(cur.mtime_before)
        elif self._pending:  # nothing reached the file: nothing to take back
            self._pending = False
        elif self.durable:
            self._truncate_to(cur.start)
        else:
            # Not kept: cutting the step's records off is enough. Spoiling the STEP record's header
            # ends the journal there for any reader (its CRC fails) and costs less than a truncate;
            # the next step's records overwrite these. Removed with the journal at close.
            self._write(b"\0\0\0\0", cur.start)
            self.end = cur.start
        self.next_number = cur.number + 1
        self._current = None
        self._covered = Intervals()
        self._records = []

    def abort(self) -> None:
        """Roll back the open step (a command failed half-way): the image is as before `begin`.

        If the rollback itself fails (the disk refuses even that), the step stays in the journal,
        which is kept: `qdebug undo IMAGE` finishes the rollback later.
        """
        cur = self._current
        if cur is None:
            return
        if self._pending:  # the image was never touched in this step (an append cut short may
            self._pending = False  # have left records past `end`: they go)
            self._cut_tail(cur.start)
        else:
            records = [r for r in (_read_record(self.fd, p, self.end) for p in self._records) if r is not None]
            _touch(self.fd)
            with signals_deferred():
                try:
                    _restore(self.fd, self.img.fd, self.img.path, cur, records)
                    if self.durable:
                        fsync(self.img.fd, self.img.path, data_only=True)
                    _set_mtime(self.img.fd, cur.mtime_before)
                    self._truncate_to(cur.start)
                except QcowError as e:
                    _touch(self.fd)
                    self._current = None
                    self.broken = (f"{self.img.path}: rolling back a failed step failed too ({e}); the undo "
                                   f"journal {self.path} is kept: `qdebug undo {self.img.path}` finishes the rollback")
                    self._after_restore(quiet=True)
                    raise QcowError(self.broken) from None
                self._after_restore()
        self._current = None
        self._covered = Intervals()
        self._records = []

    # ---- undo ----------------------------------------------------------------------------------
    def undo(self, steps: int | None = 1) -> int:
        """Roll back the last `steps` committed steps (None: all); returns how many were undone."""
        if self._current is not None:
            raise QcowError("journal: cannot undo while a step is open")
        if self.broken:
            raise QcowError(self.broken)
        n = len(self.starts) if steps is None else min(steps, len(self.starts))
        with signals_deferred():
            self._undo(n)
        return n

    def _undo(self, n: int) -> None:
        try:
            for _ in range(n):
                start = self.starts[-1]
                rec = _read_record(self.fd, start, self.end)
                step = StepInfo(rec.step if rec else 0, start, self.sizes[-1])
                _restore(self.fd, self.img.fd, self.img.path, step, _step_records(self.fd, step, self.end,
                                                                                 complete=True))
                if self.durable:
                    fsync(self.img.fd, self.img.path, data_only=True)
                self._truncate_to(start)
                self.starts.pop()
                self.sizes.pop()
                _set_mtime(self.img.fd, self.mtimes.pop())
                self.next_number = step.number
        finally:
            if n:
                self._after_restore()

    def _cut_tail(self, pos: int) -> None:
        """Drop what an append that did not finish (a signal, a full disk) left past `pos`."""
        if os.fstat(self.fd).st_size > pos:
            ftruncate(self.fd, pos, self.path)
        self.end = pos
        self._room = min(self._room, pos)

    def _truncate_to(self, pos: int) -> None:
        ftruncate(self.fd, pos, self.path)
        self.end = pos
        self._room = min(self._room, pos)  # (a truncate frees the space taken past the end too)
        if self.durable:
            fsync(self.fd, self.path, data_only=True)

    def _after_restore(self, quiet: bool = False) -> None:
        """The file changed behind the Image's back: map it again and re-read the header."""
        try:
            self.img.remap()
            self.img.reload_header()
        except QcowError:
            if not quiet:
                raise

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
            empty = not self.starts and not self.broken
            try:  # an empty journal goes (where the directory refuses that, an empty file stays);
                if empty:  # a kept one loses what an append cut short left past its end
                    ftruncate(self.fd, 0, self.path)
                elif not self.broken:
                    self._cut_tail(self.end)
            except QcowError:
                pass
            os.close(self.fd)
            self.fd = -1
            if empty:
                _remove(self.path)

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- helpers ---------------------------------------------------------------------------------------
def _extents_or_all(fd: int, start: int, end: int):
    """Data runs of [start, end); all of it where the file system cannot say."""
    try:
        return list(data_extents(fd, start, end))
    except OSError:
        return [(start, end)]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    try:
        d = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError as e:
        raise storage_error(e, path, "cannot open the journal's directory") from None
    try:
        fsync(d, os.path.dirname(os.path.abspath(path)))
    finally:
        os.close(d)


# ---- undo from the command line (no live Image: the image may be mid-step and unparseable) ----------
def undo(image_path: str, steps: int | None = 1, *, lock: bool = True, discard: bool = False) -> UndoResult:
    """Roll back an interrupted step, if any, then committed steps, `steps` in all (None: all).

    An interrupted step counts as one: after a crash, `undo` with the default of one step rolls back
    only the step the crash cut short. `discard` drops the journal and keeps the image as it is.
    """
    jpath = journal_path(image_path)
    if not os.path.exists(jpath):
        raise JournalError(f"{image_path}: no undo journal ({jpath} does not exist)")
    try:
        img_fd = os.open(image_path, os.O_RDWR)
    except OSError as e:
        raise storage_error(e, image_path, "cannot open the image") from None
    image_lock = None
    try:
        if lock:
            from .locking import ImageLock

            image_lock = ImageLock(img_fd, image_path, write=True)
            image_lock.acquire()
        if discard:
            n = 0
            try:
                with open(jpath, "rb") as f:
                    n = len(_scan(f.fileno(), jpath)[0])
            except (OSError, QcowError):
                pass
            try:
                os.unlink(jpath)
            except OSError as e:
                raise storage_error(e, jpath, "cannot remove the undo journal") from None
            return UndoResult(image_path, 0, False, 0, (), discarded=n)
        try:
            jfd = os.open(jpath, os.O_RDWR)
        except OSError as e:
            raise storage_error(e, jpath, "cannot open the undo journal") from None
        try:
            all_steps, end = _scan(jfd, jpath)
            recorded = _file_header(jfd, jpath)[1] if all_steps else None
            _check_incarnation(all_steps, recorded, img_fd, image_path, jpath)
            interrupted = False
            left = len(all_steps) + 1 if steps is None else steps
            if all_steps and not all_steps[-1].committed:
                _recover(jfd, jpath, img_fd, image_path, all_steps[-1])
                end = all_steps.pop().start
                interrupted = True
                left -= 1
                ftruncate(jfd, end, jpath)
            n = max(0, min(left, len(all_steps)))
            undone = []
            if n:
                _check_unchanged(all_steps, img_fd, image_path, recorded, jpath)
            with signals_deferred():
                for _ in range(n):
                    st = all_steps[-1]
                    _restore(jfd, img_fd, image_path, st, _step_records(jfd, st, end, complete=True))
                    all_steps.pop()
                    _set_mtime(img_fd, st.mtime_before)
                    end = st.start
                    undone.append({"journal-step": st.number, **st.meta})
                    ftruncate(jfd, end, jpath)  # each step undone leaves the journal without it
                fsync(img_fd, image_path)
                fsync(jfd, jpath)
        finally:
            os.close(jfd)
        if not all_steps:
            _remove(jpath)
        return UndoResult(image_path, n, interrupted, len(all_steps), tuple(undone))
    finally:
        if image_lock is not None:
            image_lock.release()
        os.close(img_fd)


def recover(image_path: str) -> bool:
    """Before anything reads an image (to check or plan it): roll back a step an interrupted run
    left unfinished, under the image's lock. True if one was rolled back; raises the refusal."""
    jpath = journal_path(image_path)
    if not os.path.exists(jpath):
        return False
    steps = journal_steps(image_path)
    if not steps or steps[-1].committed:
        return False
    undo(image_path, steps=0)
    return True


def journal_steps(image_path: str) -> list[StepInfo]:
    """The steps recorded beside `image_path` (empty if there is no journal)."""
    jpath = journal_path(image_path)
    try:
        fd = os.open(jpath, os.O_RDONLY)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise storage_error(e, jpath, "cannot read the undo journal") from None
    try:
        return _scan(fd, jpath)[0]
    finally:
        os.close(fd)
