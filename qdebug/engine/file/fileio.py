"""Checked file I/O: every byte is written, or the caller learns why not.

`os.pwrite` may write fewer bytes than asked (a full disk mid-request, a signal) and says so only
in its return value; an error comes as a bare OSError. Every write qdebug makes (image, journal,
new images) goes through here: short writes are continued until nothing is left, and every
failure becomes a `StorageError` that keeps errno and names the file and the place.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager

from ..errors import StorageError

_LIBC = None


def storage_error(e: OSError, path: str, what: str) -> StorageError:
    return StorageError(e.errno or errno.EIO, path, what)


def pwrite_all(fd: int, data, offset: int, path: str, what: str = "") -> None:
    """Write all of `data` (bytes-like, or a list of them written as one) at `offset`."""
    where = what or "write"
    if isinstance(data, list):
        total = sum(map(len, data))
        try:
            done = os.pwritev(fd, data, offset)
        except OSError as e:
            raise storage_error(e, path, f"cannot {where} {total} bytes at offset 0x{offset:x}") from None
        if done >= total:
            return
        data, offset, skip = b"".join(data), offset, done  # the rest of a short pwritev, one piece
    else:
        total, skip = len(data), 0
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    done = skip
    while done < total:
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise storage_error(e, path, f"cannot {where} {total} bytes at offset 0x{offset:x} "
                                         f"({done} written)") from None
        if n <= 0:  # no progress on a regular file: there is no room for the rest
            raise StorageError(errno.ENOSPC, path, f"cannot {where} {total} bytes at offset 0x{offset:x} "
                                                   f"({done} written)")
        done += n


def ftruncate(fd: int, size: int, path: str, what: str = "resize the file") -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise storage_error(e, path, f"cannot {what} to {size} bytes") from None


def fsync(fd: int, path: str, *, data_only: bool = False) -> None:
    """fsync / fdatasync: a failure means written data may be lost (EIO), never to be ignored."""
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    except OSError as e:
        raise storage_error(e, path, "cannot sync to disk") from None


_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2): False where the file system or libc cannot; a refusal raises OSError."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC or length <= 0:
        return False
    if _LIBC.fallocate(fd, mode, offset, length) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros and takes no space. False where
    the file system or libc cannot; an I/O error raises OSError."""
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def reserve(fd: int, offset: int, length: int, path: str, what: str = "") -> bool:
    """fallocate(KEEP_SIZE): disk space for [offset, +length) taken now, contents and length
    unchanged, so a later write there cannot fail for want of space (on a file system that
    overwrites in place). False where it cannot be done; a full disk raises `StorageError`."""
    try:
        return _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        raise storage_error(e, path, f"cannot reserve {length} bytes{' ' + what if what else ''} at offset 0x{offset:x}") from None


def zero_range(fd: int, offset: int, length: int, path: str, what: str = "zero") -> None:
    """Make [offset, offset+length) read as zeros: a punched hole where possible (it needs no free
    space, so an undo on a full disk still works), else zeros written."""
    try:
        if punch_hole(fd, offset, length):
            return
    except OSError as e:
        raise storage_error(e, path, f"cannot {what} {length} bytes at offset 0x{offset:x}") from None
    pwrite_all(fd, bytes(length), offset, path, what)


@contextmanager
def signals_deferred():
    """SIGINT, SIGTERM and SIGHUP wait while a rollback runs: a rollback cut short would leave the
    image half-restored. They arrive (and stop the command) right after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
