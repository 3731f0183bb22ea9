"""Where salvaged guest data goes: a raw file or a fresh qcow2 image, written front to back.

Both take `write(guest_offset, data)` calls in increasing guest order and leave holes (raw) or
unallocated clusters (qcow2) where nothing non-zero was written, so lost and zero ranges read
as zeros. The qcow2 image is laid out in one pass: header cluster, the data clusters in guest
order, then the L2 tables, the L1 table, the refcount blocks and table; every cluster has
refcount 1 and COPIED entries, so `qemu-img check` finds it clean.
"""

from __future__ import annotations

import numpy as np

from ..file.fileio import fsync, ftruncate, pwrite_all
from ..format import constants as C
from ..format.header import build_header
from ..format.refcounts import pack_refcounts


def _is_zero(data) -> bool:
    return not np.frombuffer(data, dtype=np.uint8).any()


class RawSink:
    def __init__(self, fd: int, size: int, path: str):
        self.fd = fd
        self.path = path
        ftruncate(fd, size, path)

    def write(self, offset: int, data: bytes) -> None:
        if data and not _is_zero(data):
            pwrite_all(self.fd, data, offset, self.path, "write salvaged data,")

    def close(self) -> None:
        fsync(self.fd, self.path)


class Qcow2Sink:
    """A new qcow2 image (v3, 16-bit refcounts, zlib), extended L2 when asked (cluster size >= 16K)."""

    def __init__(self, fd: int, size: int, cluster_bits: int, extended_l2: bool, path: str):
        self.fd = fd
        self.path = path
        self.size = size
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.ext = extended_l2 and self.cs >= 16384
        self.per = self.cs // (16 if self.ext else 8)
        self.next = 1  # next free host cluster (0: the header, written last)
        self.cur = -1  # guest cluster being filled
        self.buf = bytearray(self.cs)
        self.dirty = False
        self.l2: dict[int, np.ndarray] = {}  # L1 index -> host cluster per entry (0: none)
        ftruncate(fd, 0, path)

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            g, within = divmod(offset + pos, self.cs)
            if g != self.cur:
                self._flush()
                self.cur = g
            n = min(len(data) - pos, self.cs - within)
            piece = data[pos:pos + n]
            if not _is_zero(piece):
                self.buf[within:within + n] = piece
                self.dirty = True
            pos += n

    def _flush(self) -> None:
        if self.dirty:
            host = self.next
            self.next += 1
            self._pwrite(bytes(self.buf), host * self.cs)
            table = self.l2.setdefault(self.cur // self.per, np.zeros(self.per, dtype=np.int64))
            table[self.cur % self.per] = host
            self.buf[:] = bytes(self.cs)
            self.dirty = False

    def close(self) -> None:
        self._flush()
        cs = self.cs
        l1_size = max(1, -(-(-(-self.size // cs)) // self.per))
        l1 = np.zeros(l1_size, dtype=">u8")
        for idx in sorted(self.l2):
            host = self.l2[idx]
            off = np.where(host != 0, (host.astype(np.uint64) * np.uint64(cs)) | np.uint64(C.QCOW_OFLAG_COPIED), np.uint64(0))
            if self.ext:
                words = np.zeros((self.per, 2), dtype=np.uint64)
                words[:, 0] = off
                words[:, 1] = np.where(host != 0, C.BITMAP_ALL_ALLOC, 0)
                body = words.astype(">u8").tobytes()
            else:
                body = off.astype(">u8").tobytes()
            t = self.next
            self.next += 1
            self._pwrite(body, t * cs)
            l1[idx] = (t * cs) | C.QCOW_OFLAG_COPIED
        l1_off = self.next * cs
        l1_clusters = -(-l1_size * 8 // cs)
        self._pwrite(l1.tobytes(), l1_off)
        self.next += l1_clusters
        # refcount blocks and table describe every cluster including themselves
        per_block = cs * 8 // 16
        blocks = table = 1
        while True:
            total = self.next + blocks + table
            nb, nt = -(-total // per_block), -(-(-(-total // per_block)) * 8 // cs)
            if (nb, nt) == (blocks, table):
                break
            blocks, table = nb, nt
        rb0 = self.next
        rt_off = (rb0 + blocks) * cs
        refs = np.zeros(blocks * per_block, dtype=np.uint64)
        refs[:total] = 1
        for b in range(blocks):
            self._pwrite(pack_refcounts(refs[b * per_block:(b + 1) * per_block], 4), (rb0 + b) * cs)
        rt = np.zeros(table * cs // 8, dtype=">u8")
        rt[:blocks] = (np.arange(rb0, rb0 + blocks, dtype=np.uint64) * np.uint64(cs))
        self._pwrite(rt.tobytes(), rt_off)
        head = build_header(cluster_bits=self.cb, size=self.size, l1_size=l1_size, l1_table_offset=l1_off,
                            refcount_table_offset=rt_off, refcount_table_clusters=table, refcount_order=4,
                            extended_l2=self.ext, compression_type=0)
        self._pwrite(head + bytes(cs - len(head)), 0)
        ftruncate(self.fd, total * cs, self.path)
        fsync(self.fd, self.path)

    def _pwrite(self, data: bytes, offset: int) -> None:
        pwrite_all(self.fd, data, offset, self.path, "write the salvaged image,")

