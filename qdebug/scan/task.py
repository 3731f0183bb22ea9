"""The per-image task, the same in a local worker process and on a Dask worker: sniff the magic,
check the image exactly as `qdebug check` does (`check_file`), and return a small picklable
`Outcome` holding the JSON line (`qdebug check --output=json`'s keys plus `check-exit-code`, or
`filename` + `error`). Never raises for a bad image: every failure is an outcome."""

from __future__ import annotations

import os
import resource
import socket
import stat
import struct
from dataclasses import dataclass, field

from ..engine.check.checkfile import checked_file
from ..engine.check.signatures import find_signatures
from ..engine.errors import QcowError
from ..engine.format import constants as C

CHECKED, ERROR, SKIPPED = "checked", "error", "skipped"
# Worst first: the scan's exit code is the worst verdict (an image that could not be checked ranks
# with a check that failed: qemu-img check exits 1 for both).
SEVERITY = {2: 3, 1: 2, 3: 1, 0: 0}


@dataclass(frozen=True)
class Outcome:
    """What one examined file came to. `record` is its JSON line (None for a skipped file)."""

    filename: str
    status: str  # CHECKED | ERROR | SKIPPED
    exit_code: int = 0  # qemu-img check's (1 for an image that cannot be checked)
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    leaked_bytes: int = 0
    error: str | None = None
    signatures: tuple[str, ...] = ()
    record: dict | None = field(default=None, compare=False)
    worker: str = field(default="", compare=False)  # host:pid of the process that examined it
    worker_peak_rss: int = field(default=0, compare=False)  # its peak RSS so far, bytes
    worker_cpu: float = field(default=0.0, compare=False)  # its CPU time so far, seconds

    @property
    def severity(self) -> int:
        return SEVERITY[self.exit_code] if self.status != SKIPPED else -1


def _is_qcow2(path: str) -> bool:
    """Four bytes of magic; OSError (unreadable) propagates: such a file must be reported."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang the worker
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise QcowError("not a regular file or block device")
        head = os.pread(fd, 4, 0)
    finally:
        os.close(fd)
    return len(head) == 4 and struct.unpack(">I", head)[0] == C.QCOW_MAGIC


_NAME: tuple[int, str] = (0, "")


def _worker() -> dict:
    """Who examined a file, and that process's peak memory and CPU time so far (a scan reports
    both: they size a cluster's workers)."""
    global _NAME
    if _NAME[0] != os.getpid():  # once per process (workers are forked)
        _NAME = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"worker": _NAME[1], "worker_peak_rss": ru.ru_maxrss * 1024, "worker_cpu": ru.ru_utime + ru.ru_stime}


def check_one(path: str, explicit: bool, force_share: bool, signatures: bool = True) -> Outcome:
    """One file: skipped (walked, not qcow2), an error record, or the check's record (with the
    known-bug signatures it shows under "signatures": a list, null when not looked for)."""
    try:
        if not _is_qcow2(path):
            if not explicit:
                return Outcome(path, SKIPPED, **_worker())
            raise QcowError("not a qcow2 image (no QFI\\xfb magic at offset 0)")
        with checked_file(path, force_share=force_share, keep_references=False) as (img, report):
            cluster = img.header.cluster_size
            found = find_signatures(img, report) if signatures else ()
    except (QcowError, OSError) as e:
        return _error(path, str(e) if isinstance(e, QcowError) else (e.strerror or str(e)))
    except MemoryError:
        return _error(path, "out of memory while checking")
    except Exception as e:  # noqa: BLE001 - a scan reports a bug per image and goes on
        return _error(path, f"internal error: {type(e).__name__}: {e}")
    record = report.to_json()
    record["check-exit-code"] = report.exit_code
    record["signatures"] = [s.to_json() for s in found] if signatures else None  # null: not looked for
    return Outcome(path, CHECKED, report.exit_code, report.corruptions, report.leaks, report.check_errors,
                   report.leaks * cluster, signatures=tuple(s.name for s in found), record=record, **_worker())


def _error(path: str, message: str) -> Outcome:
    return Outcome(path, ERROR, 1, error=message, record=error_record(path, message), **_worker())


def error_record(path: str, message: str) -> dict:
    """The JSON line of a file that could not be checked (qemu-img check's exit code then: 1)."""
    return {"filename": path, "error": message, "check-exit-code": 1}


def check_chunk(items: list[tuple[str, bool]], force_share: bool, signatures: bool = True) -> list[Outcome]:
    """A few small images per task: the per-task cost of a pool or a cluster is paid once."""
    return [check_one(path, explicit, force_share, signatures) for path, explicit in items]
