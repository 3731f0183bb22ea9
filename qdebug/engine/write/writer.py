"""`WriteEngine`: runs qemu-io commands against an image the way one QEMU 7.2 qemu-io process does.

One engine = one process: the allocator state (free cluster index, compressed packing offset)
lives as long as the engine, and a fatal corruption makes every later command fail, as QEMU's
block driver is gone. The engine's `WriteMode` says what a step does to the file: EXECUTE writes
through (each step can be undone by the journal), WRITE_BACK is QEMU's own writeback cache (guest
data written at once, L1/L2 entries and refcounts held back in overlay pages until `flush()`),
SIMULATE is a dry run of a whole trace (each command planned on top of the metadata the earlier
ones would have written, the image never written). In any mode `plan(cmd)` shows what the next
command would do without changing anything. `state` / `restore_state` let an undo journal put the
allocator back so that redo reproduces QEMU exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import CorruptImage, FatalCorruption, QcowError
from ..file.chain import Chain
from ..format import constants as C
from ..read.guest import check_read, read_guest
from .allocator import Allocator, AllocatorState
from .compressed import hazard_for, write_compressed
from .context import StepContext, StepFailed
from .datapath import pwrite
from .discard import discard
from .ops import Command
from .plan import Hazard, WritePlan
from .step import StepRecord, StepTrace
from .txn import EXECUTE, PAGE, PLAN, SIMULATE, WRITE_BACK, Txn, WriteMode
from .zeroes import write_zeroes

_FILLS: dict[int, memoryview] = {}  # pattern byte -> a 64 KiB run of it, never copied
_RUN = 64 << 10


def _pattern(byte: int):
    """Guest data of one byte: slices of a shared run; longer writes as a list of them (pwritev)."""
    def fill(_off: int, n: int):
        run = _FILLS.get(byte)
        if run is None:
            run = _FILLS[byte] = memoryview(bytes([byte]) * _RUN)
        if n <= _RUN:
            return run[:n]
        whole, rest = divmod(n, _RUN)
        return [run] * whole + ([run[:rest]] if rest else [])
    return fill


class EngineState:
    """Everything a qemu-io process remembers between commands (treated as immutable; a plain
    class for the reason AllocatorState is one)."""

    __slots__ = ("allocator", "dead")

    def __init__(self, allocator: AllocatorState | None = None, dead: bool = False):
        self.allocator = AllocatorState() if allocator is None else allocator
        self.dead = dead

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EngineState) and (self.allocator, self.dead) == (other.allocator, other.dead)

    def __repr__(self) -> str:
        return f"EngineState(allocator={self.allocator!r}, dead={self.dead})"


class WriteEngine:
    def __init__(self, chain: Chain, mode: WriteMode = EXECUTE):
        if (mode is EXECUTE or mode is WRITE_BACK) and not chain.top.writable:
            raise QcowError(f"{chain.top.path}: opened read-only; writing needs it writable")
        self.chain = chain
        self.mode = mode
        self._top = chain.top  # (a chain's layers never change; the property is interpreted code)
        self.geo = chain.top.geometry
        self._has_backing = len(chain.layers) > 1
        self._state = EngineState()
        self._alloc: Allocator | None = None
        # SIMULATE and WRITE_BACK: metadata pages the earlier commands wrote (not yet in the file),
        # and the file length they reached
        self._overlay: dict[int, bytearray] = {}
        self._overlay_size = 0
        self._txn: Txn | None = None
        # WRITE_BACK: called after each step with the pages it newly holds back (the replay takes
        # disk room for their flush then); raising fails the step, which is taken back out
        self.on_held_back: Callable[[list[int]], None] | None = None
        self.minimal_cow = False  # whatif --policy minimal-cow: NOT QEMU (use_minimal_cow)

    def use_minimal_cow(self) -> None:
        """Plan with the minimal-COW policy (minimal_cow.py) instead of QEMU's: NOT what QEMU does,
        so only a dry run may (an image written this way is not what QEMU would have made)."""
        if self.mode is not SIMULATE:
            raise QcowError("the minimal-COW policy is not QEMU's: only a dry run plans with it")
        self.minimal_cow = True

    @property
    def state(self) -> EngineState:
        return self._state

    def restore_state(self, state: EngineState) -> None:
        """Back to an earlier state (the undo journal has put the file back): caches are dropped."""
        self._state = state
        if self._alloc is not None:
            self._alloc.drop_caches()

    def plan(self, cmd: Command) -> WritePlan:
        """What `cmd` would do now (after the commands run so far); changes nothing."""
        return self._run(cmd, PLAN, 0).plan

    def run(self, cmd: Command, index: int = 0) -> StepRecord:
        """Run one command in the engine's mode; `index` is its place in the session."""
        mode = self.mode
        if mode is not WRITE_BACK:
            return self._run(cmd, mode, index)
        if cmd.op == "read":
            self.flush()  # a read goes through the file as a guest's would (its metadata written first)
        state, size = self._state, self._overlay_size
        try:
            rec = self._run(cmd, mode, index)
            if self.on_held_back is not None:
                saved = self._txn.saved  # type: ignore[union-attr]
                if saved:
                    self.on_held_back([p for p, old in saved.items() if old is None])
            return rec
        except BaseException:
            # Take the step's metadata back out of the overlay (its data writes, if any, went to
            # clusters nothing references then, or in place, as a failed QEMU write leaves them).
            self._txn.roll_back()  # type: ignore[union-attr]
            self._overlay_size = size
            self.restore_state(state)
            raise

    def abandon(self) -> None:
        """Forget the held-back metadata (the caller rolls the image back)."""
        self._overlay = {}

    @property
    def dirty_bytes(self) -> int:
        """Metadata held back by write-back (bounded by flushing when it grows)."""
        return len(self._overlay) * PAGE

    def flush(self) -> None:
        """WRITE_BACK: write the held-back metadata pages to the image, adjacent pages as one write,
        and give the file the length the held-back writes reached. Other modes: nothing to do."""
        if self.mode is not WRITE_BACK:
            return
        img = self._top
        pages, size = self._overlay, max(self._overlay_size, img.file_size)
        if img.file_size < size:
            img.truncate(size)
        for group in self._flush_order(sorted(pages)):
            i = 0
            while i < len(group):
                j = i + 1
                while j < len(group) and group[j] == group[j - 1] + PAGE:
                    j += 1
                start = group[i]
                data = b"".join(pages[p] for p in group[i:j])[:size - start]
                if data:
                    img.pwrite(start, data)
                i = j
        header_dirty = 0 in pages
        self._overlay = {}
        if header_dirty:
            img.reload_header()

    def _flush_order(self, offsets: list[int]) -> list[list[int]]:
        """The held-back pages in QEMU's dependency order: refcount blocks, then the refcount
        table, then L2 tables (and anything else), then the L1 table, then the header. A flush cut
        short (a kill where no journal could be kept) then leaves at most leaked clusters, never
        a table entry pointing at a cluster whose refcount or L2 table is not written yet."""
        if len(offsets) < 2:
            return [offsets]
        head = self._overlay.get(0)
        raw = bytes(head[:64]) if head is not None else self._top.pread(0, 64)
        l1_size, l1_off = int.from_bytes(raw[36:40], "big"), int.from_bytes(raw[40:48], "big")
        rt_off, rt_clusters = int.from_bytes(raw[48:56], "big"), int.from_bytes(raw[56:60], "big")
        cs = self.geo.cs
        rt_end = rt_off + rt_clusters * cs
        entries = np.frombuffer(self._txn_view(rt_off, rt_clusters * cs), dtype=">u8").astype(np.uint64)
        blocks = set((entries[entries != 0] & np.uint64(C.REFT_OFFSET_MASK)).tolist())
        refblocks: list[int] = []
        reftable: list[int] = []
        middle: list[int] = []
        l1: list[int] = []
        last: list[int] = []
        for p in offsets:
            if p == 0:
                last.append(p)
            elif rt_off <= p < rt_end:
                reftable.append(p)
            elif (p & ~(cs - 1)) in blocks:
                refblocks.append(p)
            elif l1_off <= p < l1_off + l1_size * 8:
                l1.append(p)
            else:
                middle.append(p)
        return [refblocks, reftable, middle, l1, last]

    def _txn_view(self, off: int, length: int) -> bytes:
        """Bytes as the held-back pages leave them."""
        return Txn(self._top, SIMULATE, self._overlay, self._overlay_size).pread(off, length)

    # ---- one command ----------------------------------------------------------------------------
    def _run(self, cmd: Command, mode: WriteMode, index: int) -> StepRecord:
        img = self._top
        txn = self._txn = Txn(img, mode, self._overlay, self._overlay_size)
        carry = mode is SIMULATE or mode is WRITE_BACK
        alloc = self._alloc
        if alloc is None:
            alloc = self._alloc = Allocator(txn)
        alloc.begin(txn, keep_cache=mode is not PLAN)
        state = self._state
        alloc.restore_state(state.allocator)
        trace = StepTrace(cmd, self.geo.ext, txn.writes, txn.file_size)
        trace.ops = txn.ops
        trace.geo = self.geo
        ctx = StepContext(self.chain, self.geo, self._has_backing, txn, alloc, trace)
        ctx.minimal_cow = self.minimal_cow
        dead = state.dead
        try:
            self._dispatch(ctx, cmd, mode)
        except StepFailed as e:
            trace.error = f"{cmd.failure_name} failed: {e}"
            if ctx.marked_corrupt:
                dead = True
        except CorruptImage as bad:  # (a name of its own: compiled, `e` has the type of the first clause)
            trace.error = f"{cmd.failure_name} failed: Input/output error ({bad})"
        if mode is EXECUTE:
            if txn.writes and any(w[2] == "header" for w in txn.writes):
                img.reload_header()
            self._state = EngineState(alloc.state, dead)
        elif carry:
            self._state = EngineState(alloc.state, dead)
            self._overlay_size = txn.file_size
        self._check_in_place(ctx)
        trace.frees = alloc.freed
        trace.transitions = alloc.transitions
        trace.new_refblocks = alloc.new_refblocks
        trace.file_size_after = max(txn.file_size, trace.file_size_before)
        trace.after = ctx.entries  # the step's cache of L2 entries: as it left them
        return StepRecord(index, cmd, trace, state)

    def _dispatch(self, ctx: StepContext, cmd: Command, mode: WriteMode) -> None:
        g = self.geo
        if cmd.op == "flush" or cmd.op == "quit":
            return
        if self._state.dead:
            raise StepFailed("No medium found")
        if cmd.offset + cmd.length > g.size:
            raise StepFailed("Input/output error")
        if cmd.length == 0:
            return
        if cmd.op == "read":
            if mode is SIMULATE or mode is PLAN:
                return
            try:  # QEMU's read fails where the entries it meets are broken (with or without -P)
                if cmd.pattern is None or (cmd.check_offset, cmd.check_length) != (cmd.offset, cmd.length):
                    check_read(self.chain, cmd.offset, cmd.length)  # the whole request is read
                if cmd.pattern is None:
                    return
                data = read_guest(self.chain, cmd.check_offset, cmd.check_length)  # -s/-l: a part is checked
            except FatalCorruption as bad_entry:
                if bad_entry.image != self._top.path:
                    raise  # a backing file is read-only: QEMU only fails the read
                ctx.corruption(str(bad_entry))  # the image is marked corrupt, the process's driver gone
            bad = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) != cmd.pattern)
            if len(bad):
                ctx.trace.error = f"Pattern verification failed at offset {cmd.check_offset}, {cmd.check_length} bytes"
            return
        if cmd.op == "discard":
            discard(ctx, cmd.offset, cmd.length)
        elif cmd.zero:
            write_zeroes(ctx, cmd.offset, cmd.length, cmd.unmap, cmd.no_fallback)
        elif cmd.compressed:
            write_compressed(ctx, cmd.offset, cmd.length, cmd.fill, self._owner_hazard,
                             None if cmd.source is None else cmd.payload)
        else:
            pwrite(ctx, cmd.offset, cmd.length, _pattern(cmd.fill) if cmd.source is None else cmd.payload, "write")

    # ---- hazards --------------------------------------------------------------------------------
    def _check_in_place(self, ctx: StepContext) -> None:
        """An in-place (COPIED) write into a cluster whose refcount is not 1 writes someone else's data."""
        for alloc, nb in ctx.in_place:
            for i in range(nb):
                host = alloc + i * self.geo.cs
                rc = ctx.alloc.get_refcount(host >> self.geo.cbits)
                if rc != 1:
                    ctx.trace.hazards.append(Hazard(host, self.geo.cs, f"{rc} references", None,
                                              f"hazard: in-place write to host cluster 0x{host:x} whose refcount is "
                                              f"{rc} (COPIED set on a shared cluster): other users see the new data"))

    def _owner_hazard(self, host: int, length: int) -> Hazard | None:
        """Who else owns the host clusters of [host, host+length): a live guest cluster or metadata.

        Read through the step's Txn, so a simulated step sees the tables earlier steps would have written.
        """
        txn, alloc = self._txn, self._alloc
        assert txn is not None and alloc is not None  # set by the running step
        g = self.geo
        first, last = host >> g.cbits, (host + length - 1) >> g.cbits
        reft_off, reft_len = alloc.reftable_offset, alloc.reftable_len
        meta = [(0, 1, "the header"), (reft_off >> g.cbits, -(-reft_len * 8 // g.cs), "the refcount table"),
                (g.l1_offset >> g.cbits, -(-g.l1_size * 8 // g.cs), "the L1 table")]
        for start, n, what in meta:
            if start <= last and first < start + n:
                return hazard_for(what, None, host, length)
        l1 = np.frombuffer(txn.pread(g.l1_offset, g.l1_size * 8), dtype=">u8")
        for l1_index in np.flatnonzero(l1):
            l2_off = int(l1[l1_index]) & C.L1E_OFFSET_MASK
            if not l2_off:
                continue
            if first <= l2_off >> g.cbits <= last:
                return hazard_for("an L2 table", None, host, length)
            table = np.frombuffer(txn.pread(l2_off, g.cs), dtype=">u8")
            w0 = np.asarray(table[::2] if g.ext else table, dtype=np.uint64)
            normal = (w0 & np.uint64(C.QCOW_OFLAG_COMPRESSED)) == 0
            hc = ((w0 & np.uint64(C.L2E_OFFSET_MASK)) >> np.uint64(g.cbits)).astype(np.int64)
            hit = np.flatnonzero(normal & (hc >= first) & (hc <= last) & (hc > 0))
            if len(hit):
                idx = int(hit[0])
                gc = int(l1_index) * g.l2_entries + idx
                base = int(hc[idx]) << g.cbits
                lo, hi = max(host, base), min(host + length, base + g.cs)
                guest = (gc * g.cs + lo - base, gc * g.cs + hi - base)
                return hazard_for(f"guest cluster {gc} (data)", guest, host, length)
        return None
