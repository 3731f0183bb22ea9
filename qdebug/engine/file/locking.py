"""Image locks that QEMU understands, and the other refusals that keep qdebug from breaking an image.

QEMU (file-posix, 7.2) marks each permission with a shared OFD lock on one byte of the image file:
100+p while it holds permission p, 200+p while it refuses to share it (p: 0 consistent read, 1 write,
2 write unchanged, 3 resize). A writer holds 100, 101, 103 and refuses to share 201, 203. qdebug
takes exactly those locks, so a QEMU started while qdebug writes refuses the image, and it checks
the opposite bytes of everybody else first, so qdebug refuses an image a running QEMU holds.
Locks belong to the open file description (not the process): they vanish when that fd closes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import QcowError
from ..format import constants as C

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64 / aarch64 (32 bytes)

PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 0, 1, 2, 3
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
LOCK_BASE_HELD, LOCK_BASE_UNSHARED = 100, 200
# (held permissions, permissions not shared) as a QEMU writer / read-only user takes them.
WRITER = ((PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE), (PERM_WRITE, PERM_RESIZE))
READER = ((PERM_CONSISTENT_READ,), (PERM_WRITE, PERM_RESIZE))


# Locks of one open file description merge: a second ImageLock on the same fd (a repair inside a
# session) must not drop the first one's bytes when it releases. Count holders per (file, fd, byte).
_HOLDERS: dict[tuple[int, int, int, int], int] = {}


def _key(fd: int, byte: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, fd, byte


class ImageInUse(QcowError):
    """Another process (normally a running QEMU) holds a conflicting lock on the image."""


def _fcntl_lock(fd: int, cmd: int, ltype: int, byte: int) -> tuple[int, int]:
    """One OFD lock call on a single byte; returns (l_type, l_pid) as the kernel reports them."""
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0))
    ltype_out, _whence, _start, _len, pid = _FLOCK.unpack(res)
    return ltype_out, pid


def byte_locked_by_others(fd: int, byte: int) -> bool:
    """True if another open file description holds any lock on `byte` (ours never conflict)."""
    ltype, _pid = _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte)
    return ltype != fcntl.F_UNLCK


class ImageLock:
    """The locks a QEMU writer (`write=True`) or read-only user takes, on one open fd of the image.

    `acquire()` takes the bytes, then checks that nobody else holds the opposite ones; on a conflict it
    releases what it took and raises `ImageInUse` with QEMU's own wording. Kernels without OFD locks
    disable locking, as QEMU's locking=auto does.
    """

    def __init__(self, fd_or_image, path: str | None = None, *, write: bool = True):
        if isinstance(fd_or_image, int):
            self.fd, self.path = fd_or_image, path or f"fd {fd_or_image}"
        else:
            self.fd, self.path = fd_or_image.fd, path or fd_or_image.path
        self.held, self.unshared = WRITER if write else READER
        self.write = write
        self.bytes: list[int] = []
        self.supported = True

    def _bytes(self) -> list[int]:
        return [LOCK_BASE_HELD + p for p in self.held] + [LOCK_BASE_UNSHARED + p for p in self.unshared]

    def acquire(self) -> "ImageLock":
        try:
            for b in self._bytes():
                _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, b)
                key = _key(self.fd, b)
                _HOLDERS[key] = _HOLDERS.get(key, 0) + 1
                self.bytes.append(b)
        except OSError as e:
            self.release()
            if e.errno == errno.EINVAL:
                self.supported = False  # no OFD locks here: like QEMU's locking=auto, go on unlocked
                return self
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise self._in_use("write" if self.write else "consistent read", shared=False) from None
            raise QcowError(f"{self.path}: cannot lock the image: {e.strerror}") from None
        problem = self.conflict()
        if problem is not None:
            self.release()
            raise self._in_use(*problem)
        return self

    def conflict(self) -> tuple[str, bool] | None:
        """(permission, shared?) of the first lock another process holds against ours, else None."""
        for p in self.held:
            if byte_locked_by_others(self.fd, LOCK_BASE_UNSHARED + p):
                return PERM_NAMES[p], False
        for p in self.unshared:
            if byte_locked_by_others(self.fd, LOCK_BASE_HELD + p):
                return PERM_NAMES[p], True
        return None

    def _in_use(self, perm: str, shared: bool) -> ImageInUse:
        what = f'shared "{perm}"' if shared else f'"{perm}"'
        return ImageInUse(f"{self.path} is in use by another process (a running QEMU?): Failed to get {what} lock")

    def release(self) -> None:
        """Drop our bytes, except those another ImageLock on the same fd still holds."""
        for b in self.bytes:
            try:
                key = _key(self.fd, b)
            except OSError:
                continue  # fd already closed: its locks went with it
            left = _HOLDERS.get(key, 1) - 1
            if left > 0:
                _HOLDERS[key] = left
                continue
            _HOLDERS.pop(key, None)
            try:
                _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, b)
            except OSError:
                pass  # the fd is going away anyway; closing it drops the lock
        self.bytes = []

    def __enter__(self) -> "ImageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_chain(chain, *, write: bool = True) -> list[ImageLock]:
    """Lock the top image as a writer (or reader) and every backing file as QEMU locks them (reader)."""
    locks: list[ImageLock] = []
    try:
        for depth, layer in enumerate(chain.layers):
            locks.append(ImageLock(layer.fd, layer.path, write=write and depth == 0).acquire())
    except BaseException:
        release_all(locks)
        raise
    return locks


def release_all(locks: list[ImageLock]) -> None:
    for lock in reversed(locks):
        lock.release()
    locks.clear()


def check_writable(img) -> None:
    """Refuse images QEMU would not write as they are: corrupt bit, dirty bit (needs QEMU's repair)."""
    h = img.header
    if h.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT:
        raise QcowError(
            f"{img.path}: the corrupt bit is set (QEMU refuses to write this image); repair it first with "
            f"`qdebug repair {img.path}` or `qemu-img check -r all {img.path}`")
    if h.incompatible_features & C.QCOW2_INCOMPAT_DIRTY:
        raise QcowError(
            f"{img.path}: the dirty bit is set (lazy refcounts were not written back); QEMU repairs that on "
            f"open: run `qemu-img check -r all {img.path}` first")


def check_chain_writable(chain) -> None:
    """The top image may be written; backing files never (they are opened read-only)."""
    check_writable(chain.top)
    for layer in chain.layers[1:]:
        if getattr(layer, "writable", False):
            raise QcowError(f"{layer.path}: backing file opened for writing; refusing (qdebug never writes backing files)")
