"""One command's step: what it did, recorded as plain data while it runs, and the record everyone
uses afterwards (the CLI's step log, the TUI's panels, the tests).

`StepTrace` is filled in by the write path as the step runs: the requests the qcow2 driver saw
with their L2Metas, the clusters whose entries changed (their entries before), allocations,
frees, hazards, notes and (through the Txn) every host write in order. `StepTrace.plan()` freezes
it into a `WritePlan` at any point, so a plan can be printed half-way through a step; a replay
without a step log never asks, and pays nothing for plans. `StepRecord` is that trace with the
step's place in a session: its index, the engine state before it (for undo), its journal step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..format.constants import QCOW_OFLAG_COMPRESSED
from ..format.geometry import Geometry
from ..format.subclusters import COMPRESSED, NORMAL, fast_bitmap_string
from ..read.guestview import Segment
from ..read.kinds import RAW_DATA
from .minimal_cow import avoidable_mask, mask_runs
from .ops import Command
from .plan import (
    Allocation,
    ClusterChange,
    CowPiece,
    CowSource,
    Hazard,
    HostWrite,
    HostWriteKind,
    L2MetaPlan,
    Region,
    Request,
    RequestKind,
    WritePlan,
)

if TYPE_CHECKING:
    from .cost import StepCost


class L2Meta:
    """QEMU's QCowL2Meta while its request runs: nb guest clusters from `offset` (a cluster start)
    written to host `alloc`, COW regions [cs_from, cs_to) and [ce_from, ce_to) relative to
    `offset`, the guest view of each region (`segs`, taken before the write), and whether QEMU
    zero-fills instead of copying (`skip`). Frozen as an L2MetaPlan in the plan."""

    __slots__ = ("offset", "alloc", "nb", "keep_old", "cs_from", "cs_to", "ce_from", "ce_to", "l2_off", "skip", "segs",
                 "old", "mid", "merged", "regions")

    def __init__(self, offset: int, alloc: int, nb: int, keep_old: bool, cs_from: int, cs_to: int,
                 ce_from: int, ce_to: int, l2_off: int, old: list[tuple[int, int]]):
        self.offset, self.alloc, self.nb, self.keep_old = offset, alloc, nb, keep_old
        self.cs_from, self.cs_to, self.ce_from, self.ce_to = cs_from, cs_to, ce_from, ce_to
        self.l2_off = l2_off
        self.skip = False
        self.segs: tuple[list[Segment], list[Segment]] = ([], [])
        # For the step's cost: the clusters' L2 entries before this request, the guest view of the
        # data area when QEMU reads it with both COW regions (perform_cow's merged read), whether the
        # COW went out in one write with the data; and the planned regions of a COW policy that is
        # not QEMU's ([(from, to, segments)] relative to `offset`; None: QEMU's two regions).
        self.old = old
        self.mid: list[Segment] | None = None
        self.merged = False
        self.regions: list[tuple[int, int, list[Segment]]] | None = None

    @property
    def cow_start(self) -> Region:
        return Region(self.cs_from, self.cs_to - self.cs_from)

    @property
    def cow_end(self) -> Region:
        return Region(self.ce_from, self.ce_to - self.ce_from)

    def cow_regions(self) -> list[tuple[int, int, list[Segment]]]:
        """The COW regions (relative to `offset`) with their guest-view segments: QEMU's cow_start
        and cow_end where not empty, or the regions of another policy."""
        if self.regions is not None:
            return self.regions
        out = []
        if self.cs_to > self.cs_from:
            out.append((self.cs_from, self.cs_to, self.segs[0]))
        if self.ce_to > self.ce_from:
            out.append((self.ce_from, self.ce_to, self.segs[1]))
        return out

    def avoidable(self, geo: Geometry) -> list[tuple[int, int]]:
        """(cluster of this L2Meta, subcluster mask) of the COW that copies subclusters that were `-`
        or `0` before the request and that it does not write: the guest would read them the same
        had they been left alone (none without extended L2, in a zero-fill, or of a compressed
        cluster)."""
        if not geo.ext or self.skip:
            return []
        cs = geo.cs
        out = []
        for a, b, _s in self.cow_regions():
            i = a // cs
            w0, bm = self.old[i]
            if w0 & QCOW_OFLAG_COMPRESSED:
                continue
            base = i * cs
            wf, wt = max(self.cs_to, base) - base, min(self.ce_from, base + cs) - base
            if wt > wf:
                mask = avoidable_mask(bm, a - base, b - base, wf, wt, cs, geo.nsc)
                if mask:
                    out.append((i, mask))
        return out

    def frozen(self, geo: Geometry | None = None) -> L2MetaPlan:
        """The plan's L2Meta; with the image's geometry also the avoidable COW and what COW reads."""
        sources = tuple(cow_pieces(self.segs[0]) + cow_pieces(self.segs[1]))
        if geo is None:
            return L2MetaPlan(self.offset, self.nb, self.alloc, self.keep_old, self.cow_start, self.cow_end, self.skip,
                              sources)
        avoid = []
        for i, mask in self.avoidable(geo):
            base = self.offset + i * geo.cs
            avoid += [Region(base + a * geo.sc_size, (b - a + 1) * geo.sc_size) for a, b in mask_runs(mask)]
        reads: list[CowPiece] = []
        if not self.skip:
            if self.mid is not None and self.regions is None:
                reads = cow_pieces(self.segs[0] + self.mid + self.segs[1])
            else:
                for _a, _b, segs in self.cow_regions():
                    reads += cow_pieces(segs)
        regions = () if self.regions is None else tuple(Region(a, b - a) for a, b, _s in self.regions)
        return L2MetaPlan(self.offset, self.nb, self.alloc, self.keep_old, self.cow_start, self.cow_end, self.skip,
                          sources, tuple(avoid), tuple(reads), regions)


def cow_source(kind: int, depth: int) -> CowSource:
    """The source of COW bytes a guest-view segment of `kind` at chain `depth` supplies."""
    if kind == NORMAL or kind == RAW_DATA:
        return CowSource.OLD_CLUSTER if depth == 0 else CowSource.BACKING
    if kind == COMPRESSED:
        return CowSource.DECOMPRESSED if depth == 0 else CowSource.BACKING_DECOMPRESSED
    return CowSource.ZEROS


def cow_pieces(segs: list[Segment]) -> list[CowPiece]:
    """A COW region's segments as runs of one source each (zeros from any depth are one run)."""
    out: list[CowPiece] = []
    for s, e, kind, depth, _h in segs:
        src = cow_source(kind, depth)
        d = 0 if src is CowSource.ZEROS else depth
        if out and out[-1].source is src and out[-1].depth == d:
            last = out.pop()
            out.append(CowPiece(last.guest_offset, e - last.guest_offset, src, d))
        else:
            out.append(CowPiece(s, e - s, src, d))
    return out


# A request as recorded: kind, guest offset, length, outcome, host offset or None, its L2Metas.
RequestRecord = tuple[str, int, int, str, "int | None", list[L2Meta]]


class StepTrace:
    """Plain data a step records as it runs (lists of tuples; nothing is formatted until asked)."""

    __slots__ = ("command", "extended", "requests", "before", "after", "allocations", "frees", "hazards", "notes",
                 "writes", "ops", "transitions", "new_refblocks", "error", "file_size_before", "file_size_after", "geo",
                 "_plan")

    def __init__(self, command: Command, extended: bool, writes: list[tuple[int, int, str]], file_size: int):
        self.command = command
        self.extended = extended
        self.requests: list[RequestRecord] = []
        self.before: dict[int, tuple[int, int]] = {}  # guest cluster -> (word0, bitmap) before the step
        # L2 entries as the step left them (its cache: every cluster of `before`, and more), set when it ends
        self.after: dict[int, tuple[int, int]] | None = None
        self.allocations: list[tuple[int, int, str]] = []
        self.frees: list[tuple[int, int]] = []
        self.hazards: list[Hazard] = []
        self.notes: list[str] = []
        self.writes = writes  # the Txn's (offset, length, what), in order
        self.ops: list[tuple[int, int]] = []  # the Txn's metadata cache operations (txn.FLUSH_L2...)
        self.transitions: list[int] = []  # refcounts 0 -> non-zero (cluster index) and to 0 (~index)
        self.new_refblocks: list[int] = []  # host offsets of refcount blocks the step allocated
        self.error: str | None = None
        self.file_size_before = self.file_size_after = file_size
        self.geo: Geometry | None = None  # the image's, set by the engine (a plan's COW details need it)
        self._plan: WritePlan | None = None

    def request(self, kind: str, offset: int, length: int, outcome: str = "", host: int | None = None) -> None:
        """A request without L2Metas (zero, discard, compressed); data writes append theirs directly."""
        self.requests.append((kind, offset, length, outcome, host, []))

    def plan(self, entry: Callable[[int], tuple[int, int]] | None = None) -> WritePlan:
        """The frozen plan of what is recorded so far. Once the step has ended it is built once;
        during the step, `entry` (the step's L2 entry lookup) supplies the bitmaps after."""
        if self._plan is not None:
            return self._plan
        after = self.after
        if after is None:
            if entry is None:
                raise ValueError("the step is running: pass its entry lookup to see the bitmaps so far")
            after = {gc: entry(gc) for gc in self.before}
        ext = self.extended
        clusters = tuple(ClusterChange(gc, fast_bitmap_string(b[0], b[1], ext), fast_bitmap_string(a[0], a[1], ext),
                                       b[0], a[0], b[1], a[1])
                         for gc in sorted(self.before) for b, a in ((self.before[gc], after[gc]),))
        cmd = self.command
        plan = WritePlan(
            command=cmd.text or cmd.to_qemu_io(), line=cmd.lineno,
            requests=tuple(Request(RequestKind(k), off, n, outcome, host, tuple(m.frozen(self.geo) for m in metas))
                           for k, off, n, outcome, host, metas in self.requests),
            clusters=clusters, host_writes=tuple(HostWrite(off, n, HostWriteKind(what)) for off, n, what in self.writes),
            allocations=tuple(Allocation(*a) for a in self.allocations), frees=tuple(Region(*f) for f in self.frees),
            hazards=tuple(self.hazards), error=self.error, file_size_before=self.file_size_before,
            file_size_after=self.file_size_after, notes=tuple(self.notes))
        if self.after is not None:
            self._plan = plan
        return plan


class StepRecord:
    """One command as a session ran it: the record the step log, the TUI and the tests share.

    `error` is a failure as qemu-io reports it (a command QEMU itself fails, a failed `read -P`
    check); `hazards` are host writes QEMU would make into someone else's cluster. `state_before`
    is the engine's state before the step (an undo puts it back); `journal_step` and `seconds` are
    filled in by the replay that ran the step. Made once the step has ended; treated as immutable.
    """

    __slots__ = ("index", "command", "trace", "error", "hazards", "state_before", "journal_step", "seconds")

    def __init__(self, index: int, command: Command, trace: StepTrace, state_before: object):
        self.index = index
        self.command = command
        self.trace = trace
        self.error = trace.error
        self.hazards = trace.hazards
        self.state_before = state_before
        self.journal_step: int | None = None
        self.seconds: float | None = None

    @property
    def plan(self) -> WritePlan:
        return self.trace.plan()

    @property
    def changes_image(self) -> bool:
        return self.command.changes_image

    @property
    def cost(self) -> StepCost:
        """What the step cost, as QEMU spends it (cost.py), built when asked."""
        from .cost import measure

        geo = self.trace.geo
        assert geo is not None, "a step the engine ran knows its geometry"
        return measure(self.trace, geo).frozen()

    def to_json(self, *, plan: bool = False, timing: bool = False, cost: bool = False) -> dict:
        """A step-log record (format version LOG_VERSION). Without `plan`: the step, its error,
        hazards, host writes and bitmaps (the plan's own keys, short form); with it: every key
        of the plan's JSON and the step's cost. `cost` (or `plan`): what the step cost
        (cost.StepCost). `seconds` only with `timing`, so logs of one trace diff equal."""
        p = self.plan
        out: dict = {"log-version": LOG_VERSION, "index": self.index, "line": self.command.lineno or None,
                     "command": self.command.source_text}
        if plan:
            full = p.to_json()
            del full["command"], full["line"]
            out.update(full)
        else:
            out["error"] = p.error
            out["hazards"] = [h.to_json() for h in p.hazards]
            out["host-writes"] = [w.to_json() for w in p.host_writes]
            out["clusters"] = [c.to_json(full=False) for c in p.clusters]
        if cost or plan:
            out["cost"] = self.cost.to_json()
        if timing:
            out["seconds"] = None if self.seconds is None else round(self.seconds, 6)
        return out


# 2: kebab-case keys shared with `qdebug plan --output=json`; "clusters" (a list) replaced
# version 1's "bitmaps" (an object keyed by cluster number); the full plan only with --log-plans;
# "seconds" only with --log-timing; "cost" (what the step cost, cost.StepCost) with --log-costs or
# --log-plans, added within version 2.
LOG_VERSION = 2
