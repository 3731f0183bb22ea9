"""The backing chain: opening it as QEMU does (guest reads through it are `engine.read.guest`).

Relative backing names are resolved against the overlay's directory (QEMU's path_combine). A
missing format is probed as QEMU 7.2 does (qcow2 magic, else raw) and reported in `warnings`.
`json:` and protocol-prefixed names are refused: following them from an untrusted image would let
the image choose what qdebug opens.

An image names its backing file, so it can name any file of the host (the OpenStack advisories
CVE-2024-32498, CVE-2026-24708: a converted upload turned a host file into "guest data"). Always,
after symlinks are resolved: no device, FIFO, socket, or file under /proc or /sys as a backing
file unless `--allow-backing PATH` names it. For images from elsewhere (`salvage`, `bundle`, and
every command with `--untrusted` / QDEBUG_UNTRUSTED=1) a `BackingPolicy` also confines backing
files to the top image's directory tree (or `--backing-dir DIR`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field

from ..errors import BackingError, DataFileError, QcowError
from .filemap import FileMap
from .image import Image, open_image

MAX_CHAIN_DEPTH = 64
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PSEUDO = ("/proc", "/sys")


class BackingRefused(BackingError):
    """A backing file the policy does not let qdebug open; `path` is the resolved file."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class BackingPolicy:
    """Which files may serve as backing files. `confine`: only inside the top image's directory
    tree or one of `dirs`; `allow`: files allowed whatever they are and wherever they are."""

    confine: bool = False
    dirs: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()

    @staticmethod
    def from_env(confine: bool = False) -> "BackingPolicy":
        """QDEBUG_UNTRUSTED=1 confines; QDEBUG_BACKING_DIR / QDEBUG_ALLOW_BACKING (os.pathsep
        separated) widen (the command line's --untrusted, --backing-dir, --allow-backing set them)."""
        env = os.environ
        split = lambda v: tuple(p for p in v.split(os.pathsep) if p) if v else ()  # noqa: E731
        return BackingPolicy(confine or env.get("QDEBUG_UNTRUSTED", "") not in ("", "0"),
                             split(env.get("QDEBUG_BACKING_DIR")), split(env.get("QDEBUG_ALLOW_BACKING")))

    def check(self, top_path: str, path: str, role: str = "backing file") -> str:
        """The real path of backing file (or data file: `role`) `path` of the chain of `top_path`,
        or BackingRefused."""
        real = os.path.realpath(path)
        if real in {os.path.realpath(a) for a in self.allow}:
            return real
        hint = f"(--allow-backing {show_name(real, 400)} opens it anyway)"
        try:
            st = os.stat(real)
        except OSError:
            st = None
        if _under(real, _PSEUDO):
            raise BackingRefused(f"{role} {show_name(path, 400)} is {show_name(real, 400)}, a kernel pseudo-file; "
                                 f"refusing to read it {hint}", real)
        if st is not None and not stat.S_ISREG(st.st_mode):
            what = ("a block device" if stat.S_ISBLK(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "something else")
            raise BackingRefused(f"{role} {show_name(path, 400)} is {what}, not a regular file ({show_name(real, 400)}); "
                                 f"refusing to read it {hint}", real)
        if self.confine:
            home = os.path.dirname(os.path.realpath(top_path))
            if not _under(real, (home, *map(os.path.realpath, self.dirs))):
                raise BackingRefused(f"{role} {show_name(path, 400)} resolves to {show_name(real, 400)}, outside the "
                                     f"image's directory {show_name(home, 400)}; not followed for an untrusted image "
                                     f"(--backing-dir DIR or {hint[1:-1]})", real)
        return real


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def leaves_directory(top_path: str, name: str) -> str | None:
    """Where backing name `name` of `top_path` resolves when that is outside the image's
    directory tree (symlinks resolved), else None: `info`, `layout` and `check` flag it."""
    try:
        real = os.path.realpath(resolve_backing_path(top_path, name))
    except BackingError:
        return name
    home = os.path.dirname(os.path.realpath(top_path))
    return None if _under(real, (home,)) else real


def backing_warning(top_path: str, name: str | None) -> str | None:
    """The warning for a backing name that leaves the image's directory (None: it does not)."""
    where = leaves_directory(top_path, name) if name else None
    if where is None:
        return None
    return (f"{top_path}: backing file {show_name(name)} resolves to {show_name(where, 400)}, outside the image's "
            "directory: for an image from elsewhere, open it with --untrusted (salvage and bundle do not follow it)")


class RawFile:
    """A raw file under an image (a raw backing file, or an external data file): offset in the
    file == offset asked for, zeros past its end."""

    format = "raw"

    def __init__(self, path: str, role: str = "backing file"):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise BackingError(f"cannot open {role} {show_name(path)}: {e.strerror}") from None
        self.file_size = os.lseek(self.fd, 0, os.SEEK_END)  # (fstat says 0 for a block device)
        # The block layer sees whole sectors: the tail of the last one reads as zeros (a hole).
        self.size = -(-self.file_size // 512) * 512
        try:
            self.mm = FileMap(self.fd, self.file_size, path).mapping
        except BaseException:
            os.close(self.fd)
            raise

    def pread(self, offset: int, length: int) -> bytes:
        data = bytes(self.mm[offset:offset + length]) if offset < self.file_size else b""
        return data + bytes(length - len(data))

    data_pread = pread  # (a raw file's data is the file)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.mm = b""


Layer = Image | RawFile


@dataclass
class Chain:
    """Layers top-down: layers[0] is the image, layers[d] the backing file at depth d."""

    layers: list[Layer]
    warnings: list[str] = field(default_factory=list)

    @property
    def top(self) -> Image:
        return self.layers[0]  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return self.top.size

    def layer_size(self, depth: int) -> int:
        layer = self.layers[depth]
        return layer.size

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def show_name(name: str, limit: int = 80) -> str:
    """A file name as error messages show it: quoted, and cut short (names come from the image)."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


def resolve_backing_path(overlay_path: str, name: str) -> str:
    if name.startswith("json:") or _PROTOCOL.match(name):
        raise BackingError(f"{overlay_path}: backing file name {show_name(name)} uses a protocol or json: "
                           "prefix; refusing to follow it (header field backing_file_offset, offset 8)")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(overlay_path), name)


def unreachable(path: str) -> str | None:
    """Why `path` cannot be opened, in words ("not found", "is a loop of symbolic links"), or None."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return "not found" if not os.path.islink(path) else "is a symbolic link to nowhere"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be opened: {e.strerror}"
    return None


def check_regular(path: str) -> None:
    """Refuse FIFOs, sockets, ttys...: opening or reading them could block forever."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise BackingError(f"cannot open backing file {show_name(path)}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BackingError(f"backing file {show_name(path)} is not a regular file or block device")


def probe_format(path: str) -> str:
    check_regular(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BackingError(f"cannot open backing file {show_name(path)}: {e.strerror}") from None
    return "qcow2" if magic == b"QFI\xfb" else "raw"


class DataFiles:
    """What `open_chain` does with images that keep their data in an external data file."""

    REFUSE = "refuse"  # refuse such an image (commands that write, plan or salvage)
    OPEN = "open"  # open each image's data file, as QEMU does (map, read, check)
    SKIP = "skip"  # the metadata only: qemu-img info opens no data file


def check_data_file_header(img: Image) -> None:
    """The refusals of QEMU 7.2's qcow2 open about data files, in its words."""
    h = img.header
    if h.has_data_file and h.data_file_path is None:
        raise DataFileError(f"{img.path}: 'data-file' is required for this image (incompatible bit 2 is set "
                           "but no data file name extension names it)")
    if h.data_file_raw and not h.has_data_file:
        raise DataFileError(f"{img.path}: data-file-raw requires a data file (autoclear bit 1 is set without "
                           "incompatible bit 2)")


def _missing_data_file(img: Image, name: str) -> str | None:
    """"IMG: data file NAME not found from the current directory (...)" when `name` cannot be
    reached (QEMU 7.2 and 10.0 open a relative name from the current directory, not from the
    image's), else None."""
    problem = unreachable(name)
    if problem is None:
        return None
    where = "" if os.path.isabs(name) else f" from the current directory ({show_name(os.getcwd(), 200)}, where QEMU opens it too)"
    return f"{img.path}: data file {show_name(name)} {problem}{where}"


def data_file_warning(img: Image) -> str | None:
    """Why map, check and read would not find `img`'s data file from here (info opens none, so
    it only warns), or None."""
    name = img.header.data_file_path if img.header.has_data_file else None
    if not name or name.startswith("json:") or _PROTOCOL.match(name):
        return None
    missing = _missing_data_file(img, name)
    return None if missing is None else f"{missing}: map, check and read need it"


def data_file_name(img: Image, top_path: str, policy: BackingPolicy) -> str | None:
    """The name `img`'s external data file is opened by (None: the image has none), once it has
    passed QEMU's refusals and the backing-file rules (`policy`: the name comes from the image, so
    no device, FIFO or pseudo-file unless --allow-backing names it, confined to the image's
    directory tree for an untrusted image); DataFileError otherwise."""
    check_data_file_header(img)
    if not img.header.has_data_file:
        return None
    name = img.header.data_file_path or ""
    if name.startswith("json:") or _PROTOCOL.match(name):
        raise DataFileError(f"{img.path}: data file name {show_name(name)} uses a protocol or json: prefix; "
                            "refusing to follow it (header extension 0x44415441)")
    missing = _missing_data_file(img, name)
    if missing is not None:
        raise DataFileError(missing)
    try:
        policy.check(top_path, name, "data file")
    except BackingError as e:
        raise DataFileError(f"{img.path}: {e}") from None
    return name


def attach_data_file(img: Image, top_path: str, policy: BackingPolicy) -> None:
    """Open `img`'s external data file into `img.data` (nothing for an image without one), as
    QEMU opens it (see data_file_name)."""
    if img.data is not None:
        return
    name = data_file_name(img, top_path, policy)
    if name is None:
        return
    try:
        img.data = RawFile(name, "data file")
    except BackingError as e:
        raise DataFileError(f"{img.path}: {e}") from None


def open_chain(path: str, *, writable: bool = False, no_backing: bool = False,
               max_depth: int = MAX_CHAIN_DEPTH, policy: BackingPolicy | None = None,
               data_files: str = DataFiles.REFUSE) -> Chain:
    """Open `path` and its backing chain (read-only below the top); `policy` (default: from the
    environment, see BackingPolicy.from_env) says which backing files (and data files) may be
    opened; `data_files` what to do with images that keep their data in an external data file."""
    policy = BackingPolicy.from_env() if policy is None else policy
    external = data_files != DataFiles.REFUSE
    top = open_image(path, writable=writable, external_data=external)
    chain = Chain([top])
    seen = {os.path.realpath(path)}
    try:
        if data_files == DataFiles.OPEN:
            attach_data_file(top, path, policy)
        elif data_files == DataFiles.REFUSE:
            check_data_file_header(top)
        cur: Image = top
        while cur.header.backing_file and not no_backing:
            if len(chain.layers) > max_depth:
                raise BackingError(f"{path}: backing chain deeper than {max_depth} layers")
            name = cur.header.backing_file
            bpath = resolve_backing_path(cur.path, name)
            real = os.path.realpath(bpath)
            if real in seen:
                raise BackingError(f"{cur.path}: backing file {show_name(name)} makes a loop in the backing chain")
            seen.add(real)
            problem = unreachable(bpath)
            if problem:
                raise BackingError(f"{cur.path}: backing file {show_name(bpath)} {problem} "
                                   "(use --no-backing to inspect this layer alone)")
            policy.check(path, bpath)
            check_regular(bpath)
            fmt = cur.header.backing_format
            if fmt is None:
                fmt = probe_format(bpath)
                chain.warnings.append(f"{cur.path}: backing file {show_name(name)} has no declared format; "
                                      f"probed as {fmt} (as QEMU 7.2 does)")
            if fmt == "qcow2":
                try:
                    nxt = open_image(bpath, external_data=external)
                except QcowError as e:
                    raise BackingError(f"backing file {bpath}: {e}") from None
                chain.layers.append(nxt)
                if data_files == DataFiles.OPEN:
                    attach_data_file(nxt, path, policy)
                cur = nxt
            elif fmt == "raw":
                chain.layers.append(RawFile(bpath))
                break
            else:
                raise BackingError(
                    f"{cur.path}: backing format {show_name(fmt)} is not supported (qcow2 and raw are)")
    except BaseException:
        chain.close()
        raise
    return chain
