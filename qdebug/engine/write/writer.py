"""`WriteEngine`: runs qemu-io commands against an image the way one QEMU 7.2 qemu-io process does.

One engine = one process: the allocator state (free cluster index, compressed packing offset)
lives as long as the engine, and a fatal corruption makes every later command fail, as QEMU's
block driver is gone. `plan()` runs a command without writing (the writes are only recorded);
`execute()` runs the same code and writes. `simulate()` is a dry run of a whole trace: each command
is planned on top of the metadata the earlier simulated commands would have written (kept in memory
as overlay pages, with the allocator state carried on), so its plan is the one `execute()` would
make at that point of the trace; the image is never written. `state` / `restore_state` let an undo
journal put the allocator back so that redo reproduces QEMU exactly.

`writeback=True` is QEMU's own writeback cache: `execute()` writes guest data at once but keeps the
metadata (L1/L2 entries, refcounts) in the same overlay pages a simulation uses until `flush()`,
which writes them in a few large writes. A replay that needs no per-step undo runs this way (one
journal step per flush keeps it crash-safe); per-step undo needs the write-through mode.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptImage, QcowError
from ..file.chain import Chain
from ..format import constants as C
from ..read.guest import read_guest
from .allocator import Allocator, AllocatorState
from .compressed import hazard_for, write_compressed
from .context import Geometry, StepContext, StepFailed
from .datapath import pwrite
from .discard import discard
from .ops import Command
from .plan import ClusterChange, Hazard, Request, WritePlan
from .txn import PAGE, HostWrite, Txn
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


class StepResult:
    """One executed or simulated command: its hazards and error at once, its plan when asked for.

    The plan (bitmap strings, host write records...) is built on first use: a replay without a
    step log reads only the hazards and the error, and building every plan would cost it more
    than running the command.
    """

    __slots__ = ("command", "hazards", "error", "_make", "_plan")

    def __init__(self, command: Command, hazards: list[Hazard], error: str | None, make_plan):
        self.command = command
        self.hazards = hazards
        self.error = error
        self._make = make_plan
        self._plan: WritePlan | None = None

    @property
    def plan(self) -> WritePlan:
        if self._plan is None:
            self._plan = self._make()
            self._make = None
        return self._plan

    @property
    def host_writes(self) -> list[HostWrite]:
        return list(self.plan.host_writes)

    @property
    def clusters(self) -> dict[int, tuple[str, str]]:
        return {c.guest_cluster: (c.bitmap_before, c.bitmap_after) for c in self.plan.clusters}


class WriteEngine:
    def __init__(self, chain: Chain, *, writeback: bool = False):
        if not chain.top.writable:
            raise QcowError(f"{chain.top.path}: opened read-only; the write engine needs it writable")
        self.chain = chain
        self._top = chain.top  # (a chain's layers never change; the property is interpreted code)
        self.geo = Geometry(chain)
        self.writeback = writeback
        self._state = EngineState()
        self._alloc: Allocator | None = None
        # simulate() and write-back: metadata pages the earlier commands wrote (not yet in the file),
        # and the file length they reached
        self._overlay: dict[int, bytearray] = {}
        self._overlay_size = 0
        self._simulating = False
        self._simulated = False
        self._txn: Txn | None = None

    @property
    def state(self) -> EngineState:
        return self._state

    def restore_state(self, state: EngineState) -> None:
        """Back to an earlier state (the undo journal has put the file back): caches are dropped."""
        self._state = state
        if self._alloc is not None:
            self._alloc.drop_caches()

    def plan(self, cmd: Command) -> WritePlan:
        """What `cmd` would do now (after the commands executed or simulated so far); changes nothing."""
        return self._run(cmd, apply=False).plan

    def execute(self, cmd: Command) -> StepResult:
        if self._simulated:
            raise QcowError("this engine has simulated commands: it cannot execute any more")
        if not self.writeback:
            return self._run(cmd, apply=True)
        if cmd.op == "read" and cmd.pattern is not None:
            self.flush()  # the check reads the file as a guest would
        state, size = self._state, self._overlay_size
        try:
            return self._run(cmd, apply=False, carry=True, write_data=True)
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
        """Write the held-back metadata pages to the image, adjacent pages as one write, and give
        the file the length the held-back writes reached."""
        if self._simulated or not self.writeback:
            return
        img = self._top
        pages, size = self._overlay, max(self._overlay_size, img.file_size)
        offsets = sorted(pages)
        i = 0
        while i < len(offsets):
            j = i + 1
            while j < len(offsets) and offsets[j] == offsets[j - 1] + PAGE:
                j += 1
            start = offsets[i]
            data = b"".join(pages[p] for p in offsets[i:j])[:size - start]
            if data:
                img.pwrite(start, data)
            i = j
        if img.file_size < size:
            img.truncate(size)
        header_dirty = 0 in pages
        self._overlay = {}
        if header_dirty:
            img.reload_header()

    def simulate(self, cmd: Command) -> StepResult:
        """A dry-run step: the result `execute(cmd)` would give after the commands simulated before,
        without writing the image (a `read -P` is not checked: the data is not materialised)."""
        self._simulating = self._simulated = True
        try:
            return self._run(cmd, apply=False, carry=True)
        finally:
            self._simulating = False

    # ---- one command ----------------------------------------------------------------------------
    def _run(self, cmd: Command, *, apply: bool, carry: bool = False, write_data: bool = False):
        img = self._top
        if apply:
            txn = Txn(img, apply=True)
        elif carry:  # simulate / write-back: this step's metadata writes extend the overlay in place
            txn = Txn(img, pages=self._overlay, file_size=self._overlay_size, write_data=write_data,
                      undoable=not self._simulating)
        else:
            txn = Txn(img, base=self._overlay, file_size=self._overlay_size)
        self._txn = txn
        alloc = self._alloc
        if alloc is None:
            alloc = self._alloc = Allocator(txn)
        alloc.begin(txn, keep_cache=apply or carry)
        alloc.restore_state(self._state.allocator)
        ctx = StepContext(self.chain, self.geo, txn, alloc)
        size_before = txn.file_size
        error = None
        dead = self._state.dead
        try:
            error = self._dispatch(ctx, cmd)
        except StepFailed as e:
            error = f"{cmd.op} failed: {e}"
            if any(n.startswith("QEMU marks the image corrupt") for n in ctx.notes):
                dead = True
        except CorruptImage as bad:  # (a name of its own: compiled, `e` has the type of the first clause)
            error = f"{cmd.op} failed: Input/output error ({bad})"
        if apply:
            if txn.writes and any(w[2] == "header" for w in txn.writes):
                img.reload_header()
            self._state = EngineState(alloc.state, dead)
        elif carry:
            self._state = EngineState(alloc.state, dead)
            self._overlay_size = txn.file_size
        self._check_in_place(ctx)
        freed, size_after = alloc.freed, max(txn.file_size, size_before)

        def make_plan() -> WritePlan:
            return WritePlan(
                command=cmd.text or cmd.to_qemu_io(), lineno=cmd.lineno,
                requests=tuple(Request(*r) if isinstance(r, tuple) else r() for r in ctx.requests),
                clusters=tuple(self._changes(ctx)), host_writes=tuple(txn.host_writes()),
                allocations=tuple(ctx.allocations), frees=tuple(freed), hazards=tuple(ctx.hazards),
                error=error, file_size_before=size_before, file_size_after=size_after, notes=tuple(ctx.notes))
        return StepResult(cmd, ctx.hazards, error, make_plan)

    def _dispatch(self, ctx: StepContext, cmd: Command) -> str | None:
        g = self.geo
        if cmd.op == "flush":
            return None
        if self._state.dead:
            raise StepFailed("No medium found")
        if cmd.offset + cmd.length > g.size:
            raise StepFailed("Input/output error")
        if cmd.length == 0:
            return None
        if cmd.op == "read":
            if cmd.pattern is None or self._simulating:
                return None
            data = read_guest(self.chain, cmd.offset, cmd.length)
            bad = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) != cmd.pattern)
            if len(bad):
                return f"Pattern verification failed at offset {cmd.offset}, {cmd.length} bytes"
            return None
        if cmd.op == "discard":
            discard(ctx, cmd.offset, cmd.length)
        elif cmd.zero:
            write_zeroes(ctx, cmd.offset, cmd.length, cmd.unmap)
        elif cmd.compressed:
            write_compressed(ctx, cmd.offset, cmd.length, cmd.fill, self._owner_hazard)
        else:
            pwrite(ctx, cmd.offset, cmd.length, _pattern(cmd.fill), "write")
        return None

    def _changes(self, ctx: StepContext) -> list[ClusterChange]:
        out = []
        for gc in sorted(ctx.before):
            w0b, bmb = ctx.before[gc]
            w0a, bma = ctx.entry(gc)  # the step's cache: as the step left it
            out.append(ClusterChange(gc, ctx.bitmap_str(w0b, bmb), ctx.bitmap_str(w0a, bma), w0b, w0a, bmb, bma))
        return out

    # ---- hazards --------------------------------------------------------------------------------
    def _check_in_place(self, ctx: StepContext) -> None:
        """An in-place (COPIED) write into a cluster whose refcount is not 1 writes someone else's data."""
        for alloc, nb in ctx.in_place:
            for i in range(nb):
                host = alloc + i * self.geo.cs
                rc = ctx.alloc.get_refcount(host >> self.geo.cbits)
                if rc != 1:
                    ctx.hazards.append(Hazard(host, self.geo.cs, f"{rc} references", None,
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
