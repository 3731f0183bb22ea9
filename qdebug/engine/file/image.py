"""`Image`: one qcow2 file, its mmap, its header and numpy views of its tables.

Reads go through the mmap (numpy views, no copies); writes go through `pwrite` on the same file, so
the shared mapping sees them at once. Opening is read-only unless `writable=True` is asked for.
Every write is checked (`fileio`: short writes continued, errors raised as `StorageError`), and
the mapping never touches a hole where that could fault (`filemap`: tmpfs).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptImage, FatalCorruption, QcowError, UnsupportedFeature
from ..format import constants as C
from ..format.geometry import Geometry
from ..format.header import Header, parse_header
from .fileio import ftruncate, pwrite_all, storage_error
from .fileio import punch_hole as _punch
from .filemap import FileMap

_SNAP = struct.Struct(">QIHHIIQII")


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot table entry (qcow2.txt "Snapshot table")."""

    index: int
    offset: int
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    entry_size: int
    icount: int = -1  # instruction count at the snapshot (extra data >= 24 bytes); -1: not recorded


def _dtype_for_refcount_order(order: int) -> np.dtype | None:
    return {3: np.dtype("u1"), 4: np.dtype(">u2"), 5: np.dtype(">u4"), 6: np.dtype(">u8")}.get(order)


class Image:
    """An open qcow2 image. Use `open_image()`; close with `close()` or a `with` block."""

    format = "qcow2"

    def __init__(self, path: str, *, writable: bool = False, allow_unsupported: bool = False,
                 external_data: bool = False):
        self.path = path
        self.writable = writable
        # The external data file (a raw file: chain.attach_data_file opens it), where guest data lives.
        self.data: Any = None
        self._fmap: FileMap | None = None
        self.mapping: Any = b""  # an mmap (or b""): typed loosely for the compiled engine's sake
        # O_NONBLOCK: a FIFO named as the image must not hang the open (refused just below).
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise QcowError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise QcowError(f"{path}: is a directory") from None
        except PermissionError:
            raise QcowError(f"{path}: permission denied") from None
        except OSError as e:
            raise QcowError(f"{path}: {e.strerror}") from None
        try:
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise QcowError(f"{path}: not a regular file or block device")
            self._map()
            if self.file_size == 0:
                raise QcowError(f"{path}: empty file, not a qcow2 image")
            head = self._head()
            self.header: Header = parse_header(head, self.file_size)
            self._validate_supported(allow_unsupported, external_data)
            self._l1_cache: np.ndarray | None = None
            self._reftable_cache: np.ndarray | None = None
            # the header's layout constants (an attribute: the write path reads it per COW region)
            self.geometry = Geometry(self.header, self.size)
            # L1 entries the guest view has read from this image as a (read-only) backing file
            self.backing_l1: dict[int, int] = {}
            # Called as hook(offset, length, data) before any byte of the file changes, and as
            # hook(new_size, -1, None) before the file is truncated: the undo journal listens here.
            self.write_hooks: list = []
        except BaseException:
            self.close()
            raise

    # ---- file and mapping ------------------------------------------------------------------
    # `mapping` maps the file's first `map_len` bytes; `mm` is the mapping of the whole file. A write
    # that grows the file does not map it again at once (a replay grows it at almost every command):
    # `mm` does, when next asked for, and hot paths that read below `map_len` use `mapping` as is.
    @property
    def mm(self):
        if self.map_len != self.file_size:
            self._map(self.file_size)
        return self.mapping

    def _map(self, size: int | None = None) -> None:
        self.file_size = os.fstat(self.fd).st_size if size is None else size
        fmap = self._fmap
        if fmap is None or not fmap.covers(self.file_size):
            fmap = self._fmap = FileMap(self.fd, self.file_size, self.path, writable=self.writable)
        self.mapping = fmap.mapping
        self.map_len = self.file_size

    def remap(self) -> None:
        """Map the file again after it grew or shrank (old numpy views stay valid on the old map)."""
        self._fmap = None
        self._map()
        self._l1_cache = None
        self._reftable_cache = None

    def close(self) -> None:
        if getattr(self, "data", None) is not None:
            self.data.close()
            self.data = None
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        self.mapping = b""
        self._fmap = None
        self.map_len = self.file_size = getattr(self, "file_size", 0)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _validate_supported(self, allow_unsupported: bool, external_data: bool) -> None:
        h = self.header
        if allow_unsupported:
            return
        if h.crypt_method:
            raise UnsupportedFeature(
                f"{self.path}: encrypted images ({C.CRYPT_NAMES.get(h.crypt_method, h.crypt_method)}) are not supported"
            )
        if h.has_data_file and (self.writable or not external_data):
            name = f" ({h.data_file_path!r})" if h.data_file_path is not None else ""
            raise UnsupportedFeature(
                f"{self.path}: the image keeps its data in an external data file{name}: qdebug reads such images "
                "with info, map, check and read, and writes, replays, repairs or salvages none")

    def data_pread(self, offset: int, length: int) -> bytes:
        """Guest data at host offset `offset`: in the external data file where the image has one
        (its L2 offsets point there), else in the image file itself."""
        if not self.header.has_data_file:
            return self.pread(offset, length)
        if self.data is None:  # never the metadata file's bytes in its place
            raise QcowError(f"{self.path}: its external data file is not open")
        return self.data.pread(offset, length)

    @property
    def data_name(self) -> str:
        """The file guest data is read from, as qemu-img map names it."""
        return self.data.path if self.header.has_data_file and self.data is not None else self.path

    @property
    def data_size(self) -> int:
        """The length of the file guest data is read from (past it, data reads as zeros)."""
        return self.data.file_size if self.header.has_data_file and self.data is not None else self.file_size

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes at `offset`; zeros past the end of the file (as the block layer pads)."""
        if offset >= self.file_size:
            return bytes(length)
        if offset + length <= self.map_len:
            return bytes(self.mapping[offset:offset + length])
        # The file grew since it was mapped (a write-back replay grows it at almost every command):
        # read it. Mapping the whole file again for each such read, its pages faulted in afresh,
        # was more than a third of a replay's time.
        want, out = min(length, self.file_size - offset), []
        pos = offset
        while want > 0:
            try:
                b = os.pread(self.fd, want, pos)
            except OSError as e:
                raise storage_error(e, self.path, f"cannot read {length} bytes at offset 0x{offset:x}") from None
            if not b:
                break
            out.append(b)
            want -= len(b)
            pos += len(b)
        data = b"".join(out)
        return data if len(data) == length else data + bytes(length - len(data))

    def _before_change(self, offset: int, length: int, data=None) -> None:
        """Every change of the file passes here first: hooks (the journal) see it before it happens,
        as hook(offset, length, data) (length -1: a truncate to `offset`; data None: zeros, as a
        discard or a truncate leaves them)."""
        if not self.writable:
            raise QcowError(f"{self.path}: opened read-only")
        for hook in self.write_hooks:
            hook(offset, length, data)

    def _grew(self, size: int) -> None:
        """The file grew to `size`: mapped again when `mm` is next asked for (a replay grows it at
        almost every command), cached table views dropped."""
        self.file_size = size
        if self._fmap is not None and self._fmap.covers(size):
            self.map_len = size  # a pieced mapping grows in place (`written` mapped the new data)
        self._l1_cache = None
        self._reftable_cache = None

    def pwrite(self, offset: int, data) -> None:
        """The only way bytes reach the file (besides punch_hole and truncate).
        `data`: bytes-like, or a list of them written as one (pwritev)."""
        n = sum(map(len, data)) if isinstance(data, list) else len(data)
        self._before_change(offset, n, data)
        try:
            pwrite_all(self.fd, data, offset, self.path)
        except BaseException:  # part of it may be written: holes filled, the file longer
            if self._fmap is not None:
                self._fmap.refresh(offset, n)
            size = os.fstat(self.fd).st_size
            if size > self.file_size:
                self._grew(size)
            raise
        if self._fmap is not None:
            self._fmap.written(offset, n)
        if offset + n > self.file_size:
            self._grew(offset + n)

    def punch_hole(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros without changing the file length (a
        discard passed down: fallocate PUNCH_HOLE, or zeros written where that is not supported)."""
        self._before_change(offset, length, None)
        try:
            punched = _punch(self.fd, offset, length)
        except OSError as e:
            raise storage_error(e, self.path, f"cannot discard {length} bytes at offset 0x{offset:x}") from None
        if punched:
            if self._fmap is not None:
                self._fmap.punched(offset, length)
        else:
            pwrite_all(self.fd, bytes(length), offset, self.path)
            if self._fmap is not None:
                self._fmap.written(offset, length)

    def truncate(self, size: int) -> None:
        """Grow or shrink the file (growth reads as zeros)."""
        self._before_change(size, -1, None)
        ftruncate(self.fd, size, self.path)
        if self._fmap is not None:
            self._fmap.resized(self.file_size, size)
        if size >= self.file_size:
            self._grew(size)
        else:
            self.remap()

    def _head(self) -> bytes:
        """Cluster 0 (or as much of it as the file has), where header and extensions live: the
        first 64 KiB, then the rest of a bigger cluster. Read, not copied out of the mapping,
        which would fault in up to 2 MiB (every page of a small image) on each open."""
        head = os.pread(self.fd, min(self.file_size, 1 << 16), 0)
        bits = struct.unpack_from(">I", head, 20)[0] if len(head) >= 24 else C.MAX_CLUSTER_BITS
        bits = bits if C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS else C.MAX_CLUSTER_BITS
        want = min(self.file_size, 1 << bits)
        return head if want <= len(head) else head + os.pread(self.fd, want - len(head), len(head))

    def reload_header(self) -> None:
        """Re-parse the header after a write to cluster 0 (L1 / refcount table moves, flags)."""
        head = self._head()
        self.header = parse_header(head, self.file_size)
        self._l1_cache = None
        self._reftable_cache = None
        self.geometry = Geometry(self.header, self.size)
        self.backing_l1 = {}

    def u64_view(self, offset: int, count: int, what: str) -> np.ndarray:
        """A big-endian u64 view of `count` entries at `offset`, or a CorruptImage naming `what`."""
        if offset < 0 or offset + count * 8 > self.file_size:
            raise CorruptImage(
                f"{what} at 0x{offset:x} ({count} entries) runs past the end of the file (0x{self.file_size:x})"
            )
        return np.frombuffer(self.mm, dtype=">u8", count=count, offset=offset)

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return self.header.extended_l2

    @property
    def size(self) -> int:
        """Virtual size as the block layer sees it (QEMU keeps whole 512-byte sectors)."""
        return self.header.size // 512 * 512

    # ---- L1 / L2 -------------------------------------------------------------------------------
    @property
    def l1(self) -> np.ndarray:
        if self._l1_cache is None:
            h = self.header
            self._l1_cache = self.u64_view(h.l1_table_offset, h.l1_size, "L1 table") if h.l1_size else np.zeros(0, ">u8")
        return self._l1_cache

    def l2_offset(self, l1_index: int) -> int:
        if l1_index >= self.header.l1_size:
            return 0
        return int(self.l1[l1_index]) & C.L1E_OFFSET_MASK

    def l2_table(self, l2_offset: int, l1_index: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(word0, bitmap) views of the L2 table at `l2_offset`; bitmap is None for standard L2."""
        where = f"L2 table (L1 index {l1_index})" if l1_index is not None else "L2 table"
        if l2_offset % self.cluster_size:  # QEMU: "L2 table offset ... unaligned", the image marked corrupt
            raise FatalCorruption(f"{where} offset 0x{l2_offset:x} is not cluster aligned", self.path)
        n = self.header.l2_entries
        if self.extended_l2:
            both = self.u64_view(l2_offset, 2 * n, where).reshape(n, 2)
            return both[:, 0], both[:, 1]
        return self.u64_view(l2_offset, n, where), None

    def l2_entry(self, guest_cluster: int) -> tuple[int, int, int, int]:
        """(word0, bitmap, l2_offset, l2_index) of a guest cluster; zeros where no table exists."""
        n = self.header.l2_entries
        l1_index, l2_index = divmod(guest_cluster, n)
        l2_off = self.l2_offset(l1_index)
        if not l2_off:
            return 0, 0, 0, l2_index
        w0, bm = self.l2_table(l2_off, l1_index)
        return int(w0[l2_index]), int(bm[l2_index]) if bm is not None else 0, l2_off, l2_index

    # ---- refcounts ------------------------------------------------------------------------------
    @property
    def reftable(self) -> np.ndarray:
        if self._reftable_cache is None:
            h = self.header
            self._reftable_cache = self.u64_view(
                h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size // 8, "refcount table")
        return self._reftable_cache

    def refcount_block(self, block_offset: int) -> np.ndarray:
        """All refcounts of one refcount block as uint64 (a view when the width allows)."""
        h = self.header
        cs = h.cluster_size
        if block_offset % cs:
            raise CorruptImage(f"refcount block offset 0x{block_offset:x} is not cluster aligned")
        if block_offset + cs > self.file_size:
            raise CorruptImage(f"refcount block at 0x{block_offset:x} runs past the end of the file")
        dt = _dtype_for_refcount_order(h.refcount_order)
        if dt is not None:
            return np.frombuffer(self.mm, dtype=dt, count=cs // dt.itemsize, offset=block_offset)
        raw = np.frombuffer(self.mm, dtype=np.uint8, count=cs, offset=block_offset)
        bits = h.refcount_bits
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)

    def refcount(self, cluster_index: int) -> int:
        h = self.header
        block, idx = divmod(cluster_index, h.refcount_block_entries)
        if block >= len(self.reftable):
            return 0
        off = int(self.reftable[block]) & C.REFT_OFFSET_MASK
        if not off:
            return 0
        return int(self.refcount_block(off)[idx])

    # ---- snapshots -----------------------------------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        h = self.header
        return read_snapshot_table(self.pread, self.file_size, h.snapshots_offset, h.nb_snapshots)


def read_snapshot_table(pread, file_size: int, offset: int, count: int, *, tolerant: bool = False) -> list[Snapshot]:
    """The snapshot table's entries (qcow2.txt "Snapshot table"), read with `pread(offset, n)`.

    A broken entry raises CorruptImage naming it; with `tolerant` the entries before it are
    returned instead (forensics reads what is left of a damaged table)."""
    out: list[Snapshot] = []
    off = offset
    try:
        if count > C.QCOW_MAX_SNAPSHOTS:
            raise CorruptImage(f"too many snapshots: nb_snapshots={count} (offset 60)")
        for i in range(count):
            if off + _SNAP.size > file_size:
                raise CorruptImage(f"snapshot {i} at 0x{off:x} runs past the end of the file")
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
             extra) = _SNAP.unpack(pread(off, _SNAP.size))
            end = off + _SNAP.size + extra + id_len + name_len
            if end > file_size:
                raise CorruptImage(f"snapshot {i} at 0x{off:x} runs past the end of the file")
            rest = pread(off + _SNAP.size, extra + id_len + name_len)
            if extra >= 8:  # vm_state_size_large replaces the 32-bit field, as QEMU reads it
                vmsize = struct.unpack_from(">Q", rest, 0)[0]
            disk_size = struct.unpack_from(">Q", rest, 8)[0] if extra >= 16 else None
            icount = struct.unpack_from(">Q", rest, 16)[0] if extra >= 24 else -1
            if icount == (1 << 64) - 1:
                icount = -1
            sid = rest[extra:extra + id_len].decode("utf-8", "replace")
            name = rest[extra + id_len:].decode("utf-8", "replace")
            size = end - off
            size += -size % 8
            out.append(Snapshot(i, off, l1_off, l1_size, sid, name, dsec, dnsec, vmclock, vmsize,
                                disk_size, size, icount))
            off += size
    except CorruptImage:
        if not tolerant:
            raise
    return out


def open_image(path: str, *, writable: bool = False, allow_unsupported: bool = False,
               external_data: bool = False) -> Image:
    """`external_data`: let an image with an external data file open (read-only); its data file is
    opened separately (chain.attach_data_file), by the commands that read it."""
    return Image(path, writable=writable, allow_unsupported=allow_unsupported, external_data=external_data)
