"""The mapping of an image file, built so that reading it never needs a new page of the file.

On tmpfs a hole has no page behind it: reading a hole through a shared mapping makes the kernel
allocate one, and on a full tmpfs that fails with SIGBUS, which kills the process (exit 135, no
message), for a command that only reads. `pread` of a hole returns zeros without allocating. So on
tmpfs the mapping is built from pieces: private anonymous memory (the kernel's shared zero page:
reads as zeros, costs no memory) with the file mapped over it only where the file has data
(SEEK_DATA / SEEK_HOLE). The owner (`Image`) reports its own writes (`written`, `punched`,
`resized`), and the pieces follow: a write into a hole maps the file there, a punched hole or a
shrink maps zeros back. Nothing else writes the file while qdebug holds QEMU's image locks.

Other file systems (ext4, xfs, btrfs...) read a hole into the page cache without allocating disk
space, so they get one plain mmap, as before.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Any

from ..errors import QcowError

PAGE = mmap.PAGESIZE
TMPFS_MAGIC = 0x01021994
FORCE_GUARD: bool | None = None  # tests: True builds the pieced mapping on any file system
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANON, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_PROT_READ = 0x1
_libc = None


def _lib():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
        _libc = libc
    return _libc


def on_tmpfs(fd: int) -> bool:
    """The file lives on tmpfs (shmem), where reading a hole through a mapping allocates."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) comes first
    try:
        if _lib().fstatfs(fd, buf) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return ctypes.c_long.from_buffer(buf).value == TMPFS_MAGIC


def data_extents(fd: int, start: int, end: int):
    """(start, end) of each run of data in [start, end): SEEK_DATA / SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


class FileMap:
    """`mapping`: a buffer of the file's first `size` bytes (plain mmap, or pieces when `guarded`).

    A guarded map reserves more address space than the file needs, so that a file growing by its
    owner's writes stays inside it (`covers`); past it, the owner builds a new one.
    """

    def __init__(self, fd: int, size: int, path: str, *, writable: bool = False):
        self.fd, self.path, self.size = fd, path, size
        self.guarded = FORCE_GUARD if FORCE_GUARD is not None else on_tmpfs(fd)
        self.anon = None
        self.reserve = size
        # (typed loosely: compiled callers must accept an mmap and b"" alike)
        self.mapping: Any = b""
        if not size:
            self.mapping = b""
        elif not self.guarded:
            self.mapping = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        else:
            self._build(size, writable)

    # ---- the pieced mapping ------------------------------------------------------------------------
    def _build(self, size: int, writable: bool) -> None:
        from .intervals import Intervals

        self.reserve = _round_up(size + (max(size, 64 << 20) if writable else 0))
        self.mapping = mmap.mmap(-1, self.reserve, flags=_MAP_PRIVATE | _MAP_NORESERVE, prot=_PROT_READ)
        import numpy as np

        self.base = int(np.frombuffer(self.mapping, dtype=np.uint8, count=1).ctypes.data)
        self.anon = Intervals()
        self.anon.add(0, self.reserve)
        pieces = [(s - s % PAGE, min(_round_up(e), _round_up(size))) for s, e in data_extents(self.fd, 0, size)]
        self._check_room(len(pieces))
        for s, e in pieces:
            self._file(s, e)

    def _check_room(self, pieces: int) -> None:
        """Each piece is a mapping of its own (two with the zeros between): the kernel allows
        vm.max_map_count per process. Refused with a message rather than failing half-way."""
        try:
            with open("/proc/sys/vm/max_map_count") as f:
                limit = int(f.read())
            with open("/proc/self/maps") as f:
                used = sum(1 for _ in f)
        except (OSError, ValueError):
            return
        if 2 * pieces + used + 1000 > limit:
            raise QcowError(f"{self.path}: the file has {pieces} separate runs of data on tmpfs, too many to map "
                            f"without touching its holes (vm.max_map_count is {limit}); copy it to a disk "
                            "file system, or raise vm.max_map_count")

    def _mmap(self, start: int, end: int, flags: int, fd: int, what: str) -> None:
        want = self.base + start
        got = _lib().mmap(want, end - start, _PROT_READ, flags | _MAP_FIXED, fd, start if fd >= 0 else 0)
        if got != want:
            err = ctypes.get_errno()
            raise QcowError(f"{self.path}: cannot map {what} [0x{start:x}, 0x{end:x}): {os.strerror(err)}")

    def _file(self, start: int, end: int) -> None:
        if start < end:
            self._mmap(start, end, _MAP_SHARED, self.fd, "the file's data")
            self.anon.remove(start, end)

    def _zeros(self, start: int, end: int) -> None:
        if start < end:
            self._mmap(start, end, _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE, -1, "zeros")
            self.anon.add(start, end)

    # ---- the owner's changes -------------------------------------------------------------------------
    def covers(self, size: int) -> bool:
        """This mapping can show the file at `size` bytes (plain maps are built for one size)."""
        return self.guarded and size <= self.reserve

    def written(self, offset: int, length: int) -> None:
        """Bytes were written: their pages are data now (a hole filled gets the file mapped)."""
        if not self.guarded or length <= 0:
            return
        a, b = offset - offset % PAGE, min(_round_up(offset + length), self.reserve)
        for s, e in self.anon.overlaps(a, b):
            self._file(s, e)

    def refresh(self, offset: int, length: int) -> None:
        """A write failed part-way: map the file only where the range holds data now."""
        if not self.guarded or length <= 0:
            return
        a, b = offset - offset % PAGE, min(_round_up(offset + length), self.reserve)
        pos = a
        for s, e in data_extents(self.fd, a, b):
            s, e = max(s - s % PAGE, pos), min(_round_up(e), b)
            self._zeros(pos, s)
            self._file(s, e)
            pos = e
        self._zeros(pos, b)

    def punched(self, offset: int, length: int) -> None:
        """A hole was punched: whole pages in it show zeros again (partial pages keep their page)."""
        if self.guarded:
            self._zeros(_round_up(offset), min((offset + length) // PAGE * PAGE, self.reserve))

    def resized(self, old: int, new: int) -> None:
        """The file was truncated: pages wholly past a shrunken end show zeros (a shared mapping
        past the end of its file raises SIGBUS)."""
        if self.guarded and new < old:
            self._zeros(_round_up(new), min(_round_up(old), self.reserve))
