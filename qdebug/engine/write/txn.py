"""`Txn`: one step's host writes, applied, held back or only recorded, by the engine's `WriteMode`.

The write algorithms read metadata through the Txn and record every host write in order, so
planning and writing are one code path. EXECUTE applies each write at once through
`Image.pwrite` (the undo journal sees it; later reads of the same step, COW reads included, see
the image exactly as QEMU's caches would). PLAN keeps metadata changes in 4 KiB overlay pages
that later reads of the same step see, and never builds data payloads; SIMULATE does the same
with overlay pages that live across steps (a dry run of a whole trace). WRITE_BACK (a replay
without undo, like QEMU's writeback cache) keeps metadata in overlay pages that live across steps
and writes data at once; `saved` holds the pages as they were before this step, so a step that
breaks half-way can be taken back out of the overlay.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Callable, Final, Union

import numpy as np

from ..file.image import Image

PAGE: Final = 4096
_MASK: Final = ~(PAGE - 1)
_U64 = struct.Struct(">Q")
_U64_PAIR = struct.Struct(">QQ")
UINT = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I"), 8: _U64}  # by width in bytes

# Bytes to write: a buffer, or a list of buffers written with one pwritev (a long pattern write)
Data = Union[bytes, bytearray, memoryview, list]
Fill = Callable[[int, int], Data]  # guest data of (offset, length)


class WriteMode(Enum):
    """How a step's writes reach the file."""

    PLAN = "plan"  # nothing is written: one command's plan (on top of what earlier steps hold back)
    EXECUTE = "execute"  # every write applied at once (write-through; per-step undo by the journal)
    SIMULATE = "simulate"  # nothing is written; metadata carried from step to step (a dry run)
    WRITE_BACK = "write-back"  # data written at once, metadata held back until the engine flushes


# QEMU's qcow2 metadata cache operations a step records (Txn.op) besides the writes that dirty cache
# entries: qcow2_cache_flush of either cache, and qcow2_cache_set_dependency (L2 entries wait for the
# refcounts: link_l2; refcounts wait for L2: every refcount decrease).
FLUSH_REFCOUNT: Final = 1
FLUSH_L2: Final = 2
L2_AFTER_REFCOUNT: Final = 3
REFCOUNT_AFTER_L2: Final = 4

_ZEROS = bytes(1 << 21)


def _zeros(n: int):
    return memoryview(_ZEROS)[:n] if n <= len(_ZEROS) else bytes(n)


# The members as module constants: compiled, `mode is EXECUTE` is then a pointer compare (an enum
# member looked up on its class, or hashed into a dict, is a Python-level call every step).
PLAN: Final = WriteMode.PLAN
EXECUTE: Final = WriteMode.EXECUTE
SIMULATE: Final = WriteMode.SIMULATE
WRITE_BACK: Final = WriteMode.WRITE_BACK


class Txn:
    def __init__(self, img: Image, mode: WriteMode, overlay: dict[int, bytearray], file_size: int):
        """`overlay`: the metadata pages earlier steps hold back (SIMULATE / WRITE_BACK: this step
        adds to them; PLAN: it reads them and copies a page before changing it); `file_size`:
        the length those held-back writes reach."""
        self.img = img
        self.applying = mode is EXECUTE
        self.data_through = self.applying or mode is WRITE_BACK  # data is made and written now
        carry = mode is SIMULATE or mode is WRITE_BACK
        self.pages: dict[int, bytearray] = overlay if carry else {}
        self.base = overlay if mode is PLAN and overlay else None
        # pages shared with earlier steps (write-back): their content before this step, so a step
        # that breaks can be taken back out (a dry run never takes a step back: no copies)
        self.saved: dict[int, bytes | None] | None = {} if mode is WRITE_BACK else None
        self.writes: list[tuple[int, int, str]] = []  # (offset, length, what) in order
        # QEMU's metadata cache operations between those writes, (len(writes) then, op): what the
        # step's cost needs to count metadata bytes as a writethrough QEMU writes them (cost.py)
        self.ops: list[tuple[int, int]] = []
        self.file_size = max(img.file_size, file_size)

    # ---- reads (overlay first) ----------------------------------------------------------------
    def page(self, off: int) -> bytearray | None:
        """The overlay page holding byte `off`, if this step (or an earlier simulated one) wrote it."""
        page = self.pages.get(off & _MASK)
        if page is None and self.base is not None:
            page = self.base.get(off & _MASK)
        return page

    def u64(self, off: int) -> int:
        page = self.page(off)
        if page is not None:
            return _U64.unpack_from(page, off & (PAGE - 1))[0]
        img = self.img
        if off + 8 <= img.map_len:
            return _U64.unpack_from(img.mapping, off)[0]
        if off + 8 > img.file_size:
            return 0
        return _U64.unpack_from(img.mm, off)[0]

    def pread(self, off: int, length: int) -> bytes:
        if not self.pages and self.base is None:
            return self.img.pread(off, length)
        out = bytearray(self.img.pread(off, length))
        p = off & _MASK
        while p < off + length:
            page = self.page(p)
            if page is not None:
                a, b = max(p, off), min(p + PAGE, off + length)
                out[a - off:b - off] = page[a - p:b - p]
            p += PAGE
        return bytes(out)

    def dirty(self, off: int, length: int) -> bool:
        pages, base = self.pages, self.base
        for p in range(off & _MASK, off + length, PAGE):
            if p in pages or (base is not None and p in base):
                return True
        return False

    def refcount_block(self, off: int, unpack: Callable[[bytes], np.ndarray]) -> np.ndarray:
        """Refcounts of the block at `off` (the image's view unless this step changed it)."""
        cs = self.img.cluster_size
        if off + cs <= self.img.file_size and not self.dirty(off, cs):
            return self.img.refcount_block(off)
        return unpack(self.pread(off, cs))

    # ---- writes ---------------------------------------------------------------------------------
    def op(self, op: int) -> None:
        """A cache operation at this point of the step's writes (FLUSH_REFCOUNT... above)."""
        self.ops.append((len(self.writes), op))

    def write_meta(self, off: int, data: bytes, what: str) -> None:
        """A metadata write: recorded, and visible to later reads of this step."""
        if self.applying:
            self.img.pwrite(off, data)
        else:
            self._patch(off, data)
        self.record(off, len(data), what)

    def _patch(self, off: int, data) -> None:
        """Put `data` into the overlay pages (made from the file where missing)."""
        end = off + len(data)
        p = off & _MASK
        page = self._held_page(off, len(data))
        if page is not None:  # one page already in the overlay (an L2 entry, a refcount): the usual case
            page[off - p:end - p] = data
            return
        saved = self.saved
        while p < end:
            if saved is not None and p not in saved:
                old = self.pages.get(p)
                saved[p] = None if old is None else bytes(old)
            if p >= off and p + PAGE <= end:
                self.pages[p] = bytearray(data[p - off:p - off + PAGE])
                p += PAGE
                continue
            page = self.pages.get(p)
            if page is None:
                old = self.base.get(p) if self.base is not None else None
                page = self.pages[p] = bytearray(old if old is not None else self.img.pread(p, PAGE))
            a, b = max(p, off), min(p + PAGE, end)
            page[a - p:b - p] = data[a - off:b - off]
            p += PAGE

    def _hold_back(self, off: int, length: int, data) -> None:
        """Bytes that go to the file at once (data, zeros, a discard) over metadata pages still held
        back (write-back) go into those pages too, or the flush would write the old bytes over them."""
        if not self.applying and self.pages and self.dirty(off, length):
            self._patch(off, b"".join(data) if isinstance(data, list) else data)

    def roll_back(self) -> None:
        """Take this step's metadata changes back out of the shared overlay pages."""
        for p, old in (self.saved or {}).items():
            if old is None:
                self.pages.pop(p, None)
            else:
                self.pages[p] = bytearray(old)
        self.saved = {}

    def write_u64(self, off: int, value: int, what: str) -> None:
        self.write_uint(off, value, _U64, what)

    def write_uint(self, off: int, value: int, fmt: struct.Struct, what: str) -> None:
        """One big-endian integer (an L1/L2 word, a refcount) of `fmt`'s size."""
        page = self._held_page(off, fmt.size)
        if page is None:
            self.write_meta(off, fmt.pack(value), what)
            return
        fmt.pack_into(page, off & (PAGE - 1), value)
        self.record(off, fmt.size, what)

    def write_u64_pair(self, off: int, first: int, second: int, what: str) -> None:
        """Two words at once (an extended L2 entry: descriptor and subcluster bitmap)."""
        page = self._held_page(off, 16)
        if page is None:
            self.write_meta(off, _U64_PAIR.pack(first, second), what)
            return
        _U64_PAIR.pack_into(page, off & (PAGE - 1), first, second)
        self.record(off, 16, what)

    def _held_page(self, off: int, length: int) -> bytearray | None:
        """The overlay page a small write falls in, if it is there already (the usual case: packing
        into it beats making bytes and copying them in), saved first for a roll-back."""
        p = off & _MASK
        if self.applying or off + length - p > PAGE:
            return None
        page = self.pages.get(p)
        if page is not None:
            saved = self.saved
            if saved is not None and p not in saved:
                saved[p] = bytes(page)
        return page

    def write_data(self, off: int, length: int, what: str, data: Data | None) -> None:
        """A data write (guest data, COW, compressed): the caller makes the bytes only when data is
        written through (`data_through`); a plan passes None."""
        if self.data_through:
            assert data is not None, what  # only a plan leaves the bytes out
            if isinstance(data, list):  # a long pattern write: buffers written with one pwritev
                data = data[0] if len(data) == 1 else data if len(data) <= 256 else b"".join(data)
            assert (sum(map(len, data)) if isinstance(data, list) else len(data)) == length, (what, off, length)
            self._hold_back(off, length, data)  # (a hazard) data over a metadata page still held back
            self.img.pwrite(off, data)
        self.record(off, length, what)

    def record(self, off: int, length: int, what: str) -> None:
        """Note a host write of the plan (made, or whose bytes are already in place: see zero_range)."""
        self.writes.append((off, length, what))
        if off + length > self.file_size:
            self.file_size = off + length

    def zero_range(self, off: int, length: int) -> None:
        """Make [off, off+length) read as zeros, as QEMU's write-zeroes on the image file does:
        zeros are written below the end of the file, past it the file is only extended."""
        if not self.data_through:
            return
        img = self.img
        self._hold_back(off, length, _zeros(length))  # past the end of the file too
        inside = min(off + length, img.file_size) - off
        if inside > 0:
            img.pwrite(off, _zeros(inside))
        if off + length > img.file_size:
            if self.applying:
                img.truncate(off + length)
            # Write-back: reads past the end see zeros, and the flush extends the file to the
            # length the recorded writes reached; one ftruncate per write was a fifth of the I/O time.
            self.file_size = max(self.file_size, off + length)

    def discard_range(self, off: int, length: int) -> None:
        """QEMU's discard passed down to the image file: the range reads as zeros (a hole)."""
        if not self.data_through:
            return
        self._hold_back(off, length, _zeros(length))
        inside = min(off + length, self.img.file_size) - off
        if inside > 0:
            self.img.punch_hole(off, inside)
