"""Image locks that QEMU understands, and the other refusals that keep qdebug from breaking an image.

QEMU (file-posix, 7.2) marks each permission with a shared OFD lock on one byte of the image file:
100+p while it holds permission p, 200+p while it refuses to share it (p: 0 consistent read, 1 write,
2 write unchanged, 3 resize). A writer holds 100, 101, 103 and refuses to share 201, 203. qdebug
takes exactly those locks, so a QEMU started while qdebug writes refuses the image, and it checks
the opposite bytes of everybody else first, so qdebug refuses an image a running QEMU holds.
Locks belong to the open file description (not the process): they vanish when that fd closes.

Which bytes depend on how qemu-img opens the file (measured on 7.2 with /proc/locks and byte holders):
a reader holds 100 and refuses 201, 203; `qemu-img info` opens without I/O (BDRV_O_NO_IO), so it holds
nothing and only refuses 201, 203; `-U` holds 100 and refuses nothing (so even -U is refused where
another process refuses to share "consistent read"; `info -U` takes no byte at all). Backing files
are locked as readers whatever the top is opened for. A refusal says, on one line, what qemu-img says
on two: `Could not open 'top.qcow2': Could not open backing file: Failed to get shared "write" lock:
Is another process using the image [base.qcow2]?` (one "Could not open backing file: " per level
below the top; the bracket names the layer as QEMU resolved it). tests/cli/test_backing_locks.py
has the measured table.
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
INFO = ((), (PERM_WRITE, PERM_RESIZE))  # qemu-img info: opened without I/O, no "consistent read"
SHARING = ((PERM_CONSISTENT_READ,), ())  # -U (force share): reads, shares everything
BACKING_PREFIX = "Could not open backing file: "


# Locks of one open file description merge: a second ImageLock on the same fd (a repair inside a
# session) must not drop the first one's bytes when it releases. Count holders per (file, fd, byte).
_HOLDERS: dict[tuple[int, int, int, int], int] = {}


def _key(fd: int, byte: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, fd, byte


class ImageInUse(QcowError):
    """Another process (normally a running QEMU) holds a conflicting lock on the image."""


def opening(top: str, depth: int = 0) -> str:
    """qemu-img's words before a lock refusal of the layer at `depth` below `top` (as given)."""
    return f"Could not open '{top}': " + BACKING_PREFIX * depth


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
    """The locks a QEMU writer (`write=True`) or read-only user takes, on one open fd of the image
    (`perms`: another (held, not shared) pair, e.g. INFO or SHARING).

    `acquire()` takes the bytes, then checks that nobody else holds the opposite ones; on a conflict it
    releases what it took and raises `ImageInUse` with QEMU's own wording, after `where` (default:
    `opening(path)`). Kernels without OFD locks disable locking, as QEMU's locking=auto does.
    """

    def __init__(self, fd_or_image, path: str | None = None, *, write: bool = True,
                 perms: tuple[tuple[int, ...], tuple[int, ...]] | None = None, where: str | None = None):
        if isinstance(fd_or_image, int):
            self.fd, self.path = fd_or_image, path or f"fd {fd_or_image}"
        else:
            self.fd, self.path = fd_or_image.fd, path or fd_or_image.path
        self.held, self.unshared = perms or (WRITER if write else READER)
        self.where = opening(self.path) if where is None else where
        self.write = write
        self.bytes: list[int] = []
        self.supported = True

    def _bytes(self) -> list[int]:
        return [LOCK_BASE_HELD + p for p in self.held] + [LOCK_BASE_UNSHARED + p for p in self.unshared]

    def acquire(self) -> "ImageLock":
        b = 0
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
            if e.errno in (errno.EAGAIN, errno.EACCES):  # another holds it exclusively (QEMU never does)
                raise ImageInUse(f"{self.where}Failed to lock byte {b}") from None
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
        return ImageInUse(f"{self.where}Failed to get {what} lock: Is another process using the image [{self.path}]?")

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


def lock_chain(chain, *, write: bool = True, force_share: bool = False) -> list[ImageLock]:
    """Lock the top image as a writer (or reader) and every backing file as QEMU locks them (reader;
    `force_share`: as -U, every layer shared)."""
    locks: list[ImageLock] = []
    top = chain.layers[0].path
    try:
        for depth, layer in enumerate(chain.layers):
            perms = SHARING if force_share else WRITER if write and depth == 0 else READER
            locks.append(ImageLock(layer.fd, layer.path, perms=perms, where=opening(top, depth)).acquire())
    except BaseException:
        release_all(locks)
        raise
    return locks


def release_all(locks: list[ImageLock]) -> None:
    for lock in reversed(locks):
        lock.release()
    locks.clear()


class HeldFiles:
    """The locks `lock_files` took, each on a file descriptor of its own; `release` drops them all."""

    def __init__(self) -> None:
        self.locks: list[ImageLock] = []
        self.fds: list[int] = []

    def release(self) -> None:
        release_all(self.locks)
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def lock_files(path: str, *, perms=READER, backing: bool = True, each_alone: bool = False, top: bool = True,
               policy=None) -> HeldFiles:
    """The locks qemu-img takes opening `path` and (`backing`) its backing files, taken in its order
    (each file locked before its header is read, then its backing file), before the command opens
    anything. `each_alone`: every file opened as an image of its own (`info --backing-chain`), so a
    refusal names the file, not the top. `top=False`: the backing files only (the caller locks the
    image on its own file descriptor, e.g. as a writer). The walk stops quietly where the chain cannot be followed
    (a bad header, a missing or refused backing file...): the command says why, naming the file."""
    from .chain import BackingPolicy

    policy = BackingPolicy.from_env() if policy is None else policy
    held = HeldFiles()
    try:
        cur, depth, fmt, seen = path, 0, "qcow2", set()  # (real paths: filled where a backing file is followed)
        while True:
            fd = _open_regular(cur) if depth or top else -1
            if fd is None:
                break
            where = opening(cur) if each_alone else opening(path, depth)
            if fd >= 0:
                held.fds.append(fd)
                held.locks.append(ImageLock(fd, cur, perms=perms, where=where).acquire())
            nxt = None
            if fmt == "qcow2" and _may_name_files(fd, cur):
                nxt = _follow(held, path, cur, policy, perms, where, seen, backing and depth < 64)
            if nxt is None:
                break
            cur, fmt = nxt
            depth += 1
    except BaseException:
        held.release()
        raise
    return held


def _may_name_files(fd: int, path: str) -> bool:
    """False when the header's first bytes show no backing file and no external data file (most
    images of a fleet scan): the header need not be parsed for the walk. True when in doubt."""
    try:
        head = os.pread(fd, 80, 0) if fd >= 0 else b""
    except OSError:
        return True
    if len(head) < 80 or head[:4] != b"QFI\xfb":
        return True
    version, backing_offset = struct.unpack_from(">IQ", head, 4)
    incompatible = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
    return bool(backing_offset or incompatible & C.QCOW2_INCOMPAT_DATA_FILE)


def _follow(held: HeldFiles, top: str, path: str, policy, perms, where: str, seen: set[str],
            backing: bool) -> tuple[str, str] | None:
    """After qcow2 image `path` is locked: its data file's lock, then (`backing`) the backing file
    to lock next, from one read of its header (a header that does not parse ends the walk)."""
    from .image import open_image

    try:
        img = open_image(path, external_data=True)
    except QcowError:
        return None
    with img:
        if perms != INFO:
            _lock_data_file(held, img, top, policy, perms, where)
        return _backing_of(top, img, policy, seen) if backing else None


def _lock_data_file(held: HeldFiles, img, top: str, policy, perms, where: str) -> None:
    """The lock a qcow2 reader takes on its external data file (measured on 7.2: it holds
    "consistent read" and shares everything but "resize"; with -U, everything): refused, in
    qemu-img's words naming the data file, while another process refuses to share those."""
    from .chain import data_file_name

    try:
        name = data_file_name(img, top, policy)  # (the name as QEMU opens it, the rules it must pass)
    except QcowError:
        return  # the command says why, naming the file
    if name is None:
        return
    fd = _open_regular(name)
    if fd is None:
        return
    held.fds.append(fd)
    data_perms = (perms[0], tuple(p for p in perms[1] if p == PERM_RESIZE))
    held.locks.append(ImageLock(fd, name, perms=data_perms, where=where).acquire())


def _open_regular(path: str) -> int | None:
    """An fd of `path` to lock, or None: devices, FIFOs, files that do not open are the command's."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _backing_of(top: str, img, policy, seen: set[str]) -> tuple[str, str] | None:
    """(file, format) of the backing file of qcow2 image `img` as open_chain follows it, or None."""
    from .chain import probe_format, resolve_backing_path, unreachable

    path = img.path
    try:
        name, fmt = img.header.backing_file, img.header.backing_format
        if not name:
            return None
        bpath = resolve_backing_path(path, name)
        if not seen:
            seen.add(os.path.realpath(top))
        real = os.path.realpath(bpath)
        if real in seen or unreachable(bpath):
            return None
        seen.add(real)
        policy.check(top, bpath)
        fmt = fmt or probe_format(bpath)
    except QcowError:
        return None
    return (bpath, fmt) if fmt in ("qcow2", "raw") else None


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
