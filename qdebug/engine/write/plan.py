"""`WritePlan`: what QEMU 7.2 does for one qemu-io command, as plain data (JSON and text).

A plan lists the requests QEMU's block layer makes of the qcow2 driver (a zero write may become a
head, a body and a tail request, any of which may fall back to writing real zeros), the L2Metas of
every data write (cow_start / data / cow_end, in place or at a new host cluster, where each COW
byte comes from), every touched cluster's bitmap before and after, the host writes in order, and
the hazards (host writes that land in a cluster someone else owns). The planner and the writer
run the same code (`writer.WriteEngine`); a plan is that run with the writes held back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .txn import HostWrite


@dataclass(frozen=True)
class CowSource:
    """Where the bytes of a COW region come from: 'old cluster', 'zeros', 'decompressed', 'backing depth d'."""

    guest_offset: int
    length: int
    source: str


@dataclass(frozen=True)
class L2MetaPlan:
    """One QCowL2Meta: nb_clusters guest clusters from `guest_offset`, data at `alloc_offset`.

    cow_start / cow_end are (offset, length) relative to guest_offset, as in QEMU. keep_old: the
    clusters are written in place (COPIED). skip_cow: QEMU 7.2 would zero-fill [cow_start, cow_end)
    with one write-zeroes and skip the COW copy (qdebug copies the same zeros instead).
    """

    guest_offset: int
    nb_clusters: int
    alloc_offset: int
    keep_old: bool
    cow_start: tuple[int, int]
    cow_end: tuple[int, int]
    skip_cow: bool
    sources: tuple[CowSource, ...] = ()


@dataclass(frozen=True)
class Request:
    """One request the qcow2 driver sees: kind write | zero | discard | compressed | zero-fallback."""

    kind: str
    guest_offset: int
    length: int
    outcome: str = ""  # e.g. "ENOTSUP: ...", "ignored: not cluster aligned", "in place, no metadata change"
    host_offset: int | None = None
    metas: tuple[L2MetaPlan, ...] = ()


@dataclass(frozen=True)
class ClusterChange:
    """A guest cluster whose L2 entry the step changes (or whose data it writes)."""

    guest_cluster: int
    bitmap_before: str
    bitmap_after: str
    word0_before: int
    word0_after: int
    l2_bitmap_before: int
    l2_bitmap_after: int


@dataclass(frozen=True)
class Hazard:
    """A host write into a cluster another live guest cluster or metadata owns: QEMU corrupts `guest_range`."""

    host_offset: int
    length: int
    owner: str  # e.g. "guest cluster 16 (data)", "L2 table", "refcount block"
    guest_range: tuple[int, int] | None
    message: str


@dataclass(frozen=True)
class WritePlan:
    command: str
    lineno: int
    requests: tuple[Request, ...] = ()
    clusters: tuple[ClusterChange, ...] = ()
    host_writes: tuple[HostWrite, ...] = ()
    allocations: tuple[tuple[int, int, str], ...] = ()  # (host offset, length, what)
    frees: tuple[tuple[int, int], ...] = ()  # (host offset, length) whose refcount dropped
    hazards: tuple[Hazard, ...] = ()
    error: str | None = None
    file_size_before: int = 0
    file_size_after: int = 0
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        out = [f"{self.command}" + (f"   (line {self.lineno})" if self.lineno else "")]
        for r in self.requests:
            out.append(f"  {r.kind} guest [0x{r.guest_offset:x}, +0x{r.length:x})"
                       + (f" -> host 0x{r.host_offset:x}" if r.host_offset is not None else "")
                       + (f": {r.outcome}" if r.outcome else ""))
            for m in r.metas:
                where = "in place" if m.keep_old else "new cluster"
                out.append(f"    L2Meta guest 0x{m.guest_offset:x} x{m.nb_clusters} {where} @0x{m.alloc_offset:x}"
                           f"  cow_start [0x{m.cow_start[0]:x},+0x{m.cow_start[1]:x})"
                           f"  cow_end [0x{m.cow_end[0]:x},+0x{m.cow_end[1]:x})"
                           + ("  (QEMU: skip_cow, zero-fills instead)" if m.skip_cow else ""))
                for s in m.sources:
                    out.append(f"      COW guest [0x{s.guest_offset:x},+0x{s.length:x}) from {s.source}")
        for c in self.clusters:
            out.append(f"  cluster {c.guest_cluster}: {c.bitmap_before} -> {c.bitmap_after}"
                       f"   (0x{c.word0_before:x}/{c.l2_bitmap_before:016x} -> 0x{c.word0_after:x}/{c.l2_bitmap_after:016x})")
        for off, length, what in self.allocations:
            out.append(f"  allocate {what} host [0x{off:x}, +0x{length:x})")
        for off, length in self.frees:
            out.append(f"  free host [0x{off:x}, +0x{length:x})")
        for w in self.host_writes:
            out.append(f"  W host [0x{w.offset:x}, +0x{w.length:x}) {w.what}")
        for n in self.notes:
            out.append(f"  note: {n}")
        for h in self.hazards:
            out.append(f"  HAZARD: {h.message}")
        if self.error:
            out.append(f"  error: {self.error}")
        return "\n".join(out)
