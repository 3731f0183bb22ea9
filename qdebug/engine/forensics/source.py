"""`ImageFile`: a qcow2 file opened for forensics, whatever state its header is in.

`Image` refuses what QEMU refuses (an L1 table past the end of the file, a damaged extension
area...), which is right for reading and writing but leaves nothing to look at. Here the header's
fields are decoded one by one; the strict parse is kept when it succeeds (extensions, backing
name and format), and each consumer decides which fields it can trust. The file is only ever
read: opened O_RDONLY, and no mapping, so a huge file costs nothing until it is read.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptImage, NotQcow2, QcowError, UnsupportedFeature
from ..file.image import Image
from ..format import constants as C
from ..format.header import V2_HEADER_LENGTH, Header, parse_header, read_fields

_HUGE = 1 << 62  # a file size no table runs past: the strict parse without its end-of-file checks


@dataclass(frozen=True)
class HeaderReading:
    """The header's fields as found (`header`: built from the raw fields, not validated; its
    extensions and backing format come from the parse, when that succeeded) and what QEMU would
    say about them (`strict_error`: why it refuses the image, None when it opens it)."""

    header: Header
    strict_error: str | None
    extensions_known: bool  # False: the extension area could not be parsed (backing format unknown)

    @property
    def virtual_size(self) -> int:
        """The guest disk as the block layer sees it (whole 512-byte sectors)."""
        return self.header.size // 512 * 512

    @property
    def refcounts_readable(self) -> bool:
        return self.header.refcount_order <= C.MAX_REFCOUNT_ORDER


def read_header(head: bytes, file_size: int) -> HeaderReading:
    """Decode cluster 0 (`head`: its first bytes, up to one cluster of the largest size)."""
    if len(head) < 4 or struct.unpack_from(">I", head, 0)[0] != C.QCOW_MAGIC:
        raise NotQcow2("not a qcow2 image (bad magic at offset 0)")
    if len(head) < V2_HEADER_LENGTH:
        raise CorruptImage(f"header truncated: file is {len(head)} bytes, a qcow2 header needs {V2_HEADER_LENGTH}")
    raw = read_fields(head)
    bfo, bfs, cluster_bits = raw["backing_file_offset"], raw["backing_file_size"], raw["cluster_bits"]
    if not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
        raise CorruptImage(f"cluster_bits={cluster_bits} (offset 20) is outside 9..21: nothing in the file can be "
                           "located without the cluster size")
    strict_error = None
    parsed = None
    try:
        parse_header(head, file_size)
    except QcowError as e:
        strict_error = str(e)
    try:
        parsed = parse_header(head, _HUGE)
    except QcowError:
        pass
    if parsed is not None:
        extensions, backing, names = parsed.extensions, parsed.backing_file, parsed.feature_names
    else:
        extensions, backing, names = (), _raw_backing_name(head, bfo, bfs, cluster_bits), ()
    hdr = Header(**raw, extensions=extensions, backing_file=backing, feature_names=names)
    return HeaderReading(hdr, strict_error, parsed is not None)


def _raw_backing_name(head: bytes, bfo: int, bfs: int, cluster_bits: int) -> str | None:
    """The backing file name straight from its header fields (the extension area may be broken)."""
    if not bfo or bfs > C.BACKING_FILE_NAME_MAX or bfo + bfs > min(1 << cluster_bits, len(head)):
        return None
    return bytes(head[bfo:bfo + bfs]).split(b"\0", 1)[0].decode("utf-8", "replace") or None


class ImageFile:
    """A qcow2 file, read-only, with its header as found (`header`, `reading`). Reads past the
    end of the file return zeros, as QEMU's block layer pads them."""

    def __init__(self, path: str, fd: int, *, own_fd: bool):
        self.path = path
        self.fd = fd
        self._own = own_fd
        self.file_size = os.fstat(fd).st_size
        self.reading = read_header(self.pread(0, min(self.file_size, 1 << C.MAX_CLUSTER_BITS)), self.file_size)
        self.header = self.reading.header
        if self.header.has_data_file:
            # Its L2 entries point into another file: read from this one they would be
            # "recovered" bytes that are not the guest's. Refused until the data file is followed.
            name = f" ({self.header.data_file_path!r})" if self.header.data_file_path is not None else ""
            raise UnsupportedFeature(
                f"{path}: the image keeps its data in an external data file{name} (incompatible bit 2): salvage, "
                "bundle and layout do not follow data files; `qdebug map` and `qdebug read` do")

    @classmethod
    def open(cls, path: str) -> "ImageFile":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise QcowError(f"{path}: no such file") from None
        except OSError as e:
            raise QcowError(f"{path}: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise QcowError(f"{path}: not a regular file or block device")
            if os.fstat(fd).st_size == 0:
                raise QcowError(f"{path}: empty file, not a qcow2 image")
            return cls(path, fd, own_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def of(cls, img: Image) -> "ImageFile":
        """A view of an open `Image` (its descriptor stays the Image's)."""
        return cls(img.path, img.fd, own_fd=False)

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def nb_clusters(self) -> int:
        """Host clusters the file holds (the last one may be partial)."""
        return -(-self.file_size // self.header.cluster_size)

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if offset >= self.file_size:
            return bytes(length)
        data = os.pread(self.fd, min(length, self.file_size - offset), offset)
        return data if len(data) == length else data + bytes(length - len(data))

    def read_into(self, buf: np.ndarray, offset: int) -> int:
        """Fill `buf` (contiguous) from `offset`; bytes past the end of the file are zeros.
        Returns how many bytes came from the file."""
        raw = buf.reshape(-1).view(np.uint8)
        n = raw.size
        got = 0
        if offset < self.file_size:
            try:
                got = os.preadv(self.fd, [raw[:min(n, self.file_size - offset)]], offset)
            except OSError:
                got = 0
        if got < n:
            raw[got:] = 0
        return got

    def u64(self, offset: int, count: int) -> np.ndarray:
        """`count` big-endian words at `offset` as native uint64 (zeros past the end of the file)."""
        out = np.empty(count, dtype=np.uint64)
        self.read_into(out, offset)
        return native(out)

    def close(self) -> None:
        if self._own and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def native(a: np.ndarray) -> np.ndarray:
    """File-order (big-endian) words -> native integers, in place."""
    if sys.byteorder == "little":
        a.byteswap(inplace=True)
    return a


def open_file(image) -> tuple[ImageFile, bool]:
    """(ImageFile, whether the caller must close it) for a path, an `Image` or an `ImageFile`."""
    if isinstance(image, ImageFile):
        return image, False
    if isinstance(image, Image):
        return ImageFile.of(image), False
    return ImageFile.open(os.fspath(image)), True
