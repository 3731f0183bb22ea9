"""`WritePlan`: what QEMU 7.2 does for one qemu-io command, as frozen plain data (JSON and text).

A plan lists the requests QEMU's block layer makes of the qcow2 driver (a zero write may become a
head, a body and a tail request, any of which may fall back to writing real zeros), the L2Metas of
every data write (cow_start / data / cow_end, in place or at a new host cluster, where each COW
byte comes from), every touched cluster's bitmap before and after, the host writes in order, and
the hazards (host writes that land in a cluster someone else owns). A step records plain data as
it runs (`step.StepTrace`); the plan is that record, frozen, built when someone asks for it.
JSON keys are kebab-case (qemu-img's style), numbers are integers, absent values null.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple


class Region(NamedTuple):
    """A byte range: cow_start / cow_end relative to an L2Meta's first guest cluster, as in QEMU."""

    offset: int
    length: int

    def to_json(self) -> dict:
        return {"offset": self.offset, "length": self.length}


class CowSource(str, Enum):
    """Where the bytes of a COW region come from (the guest view before the write)."""

    OLD_CLUSTER = "old cluster"  # this image's data cluster being replaced
    DECOMPRESSED = "decompressed"  # this image's compressed cluster
    BACKING = "backing"  # a backing file's data (depth in CowPiece.depth)
    BACKING_DECOMPRESSED = "backing, decompressed"  # a backing file's compressed cluster
    ZEROS = "zeros"  # reads as zero (zero subclusters, holes, past a backing file's end)


@dataclass(frozen=True)
class CowPiece:
    """One run of a COW region with a single source; `depth` is the chain depth that answers it."""

    guest_offset: int
    length: int
    source: CowSource
    depth: int

    @property
    def label(self) -> str:
        if self.source in (CowSource.BACKING, CowSource.BACKING_DECOMPRESSED):
            return f"backing depth {self.depth}" + (" (decompressed)" if self.source is CowSource.BACKING_DECOMPRESSED
                                                   else "")
        return self.source.value

    def to_json(self) -> dict:
        return {"guest-offset": self.guest_offset, "length": self.length, "source": self.source.value,
                "depth": self.depth}


@dataclass(frozen=True)
class L2MetaPlan:
    """One QCowL2Meta: nb_clusters guest clusters from `guest_offset`, data at `alloc_offset`.

    keep_old: the clusters are written in place (COPIED). skip_cow: QEMU 7.2 zero-fills
    [cow_start, cow_end) with one write-zeroes and skips the COW copy (handle_alloc_space).
    avoidable: guest ranges of whole subclusters the COW copies although they were `-` or `0` and
    the write does not touch them. reads: where the bytes QEMU reads for the COW come from (the data
    area too when it reads both regions at once). regions: the COW of a policy that is not QEMU's
    (whatif --policy minimal-cow), relative to guest_offset; empty for QEMU's cow_start / cow_end.
    """

    guest_offset: int
    nb_clusters: int
    alloc_offset: int
    keep_old: bool
    cow_start: Region
    cow_end: Region
    skip_cow: bool
    sources: tuple[CowPiece, ...] = ()
    avoidable: tuple[Region, ...] = ()
    reads: tuple[CowPiece, ...] = ()
    regions: tuple[Region, ...] = ()

    def to_json(self) -> dict:
        out = {"guest-offset": self.guest_offset, "nb-clusters": self.nb_clusters,
               "alloc-offset": self.alloc_offset, "keep-old": self.keep_old,
               "cow-start": self.cow_start.to_json(), "cow-end": self.cow_end.to_json(),
               "skip-cow": self.skip_cow, "sources": [s.to_json() for s in self.sources],
               "avoidable": [r.to_json() for r in self.avoidable], "cow-reads": [s.to_json() for s in self.reads]}
        if self.regions:
            out["cow-regions"] = [r.to_json() for r in self.regions]
        return out


class RequestKind(str, Enum):
    """The requests the qcow2 driver sees."""

    WRITE = "write"
    ZERO = "zero"
    ZERO_FALLBACK = "zero-fallback"  # a zero write QEMU turned into writing real zeros (ENOTSUP)
    DISCARD = "discard"
    COMPRESSED = "compressed"


@dataclass(frozen=True)
class Request:
    kind: RequestKind
    guest_offset: int
    length: int
    outcome: str = ""  # e.g. "ENOTSUP: ...", "ignored: not cluster aligned"
    host_offset: int | None = None
    metas: tuple[L2MetaPlan, ...] = ()

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "guest-offset": self.guest_offset, "length": self.length,
                "outcome": self.outcome or None, "host-offset": self.host_offset,
                "l2-metas": [m.to_json() for m in self.metas]}


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

    def to_json(self, *, full: bool = True) -> dict:
        out = {"cluster": self.guest_cluster, "before": self.bitmap_before, "after": self.bitmap_after}
        if full:
            out.update({"entry-before": self.word0_before, "entry-after": self.word0_after,
                        "l2-bitmap-before": self.l2_bitmap_before, "l2-bitmap-after": self.l2_bitmap_after})
        return out


@dataclass(frozen=True)
class Hazard:
    """A host write into a cluster another live guest cluster or metadata owns: QEMU corrupts `guest_range`."""

    host_offset: int
    length: int
    owner: str  # e.g. "guest cluster 16 (data)", "an L2 table", "the refcount table"
    guest_range: tuple[int, int] | None
    message: str

    def to_json(self) -> dict:
        g = self.guest_range
        return {"host-offset": self.host_offset, "length": self.length, "owner": self.owner,
                "guest-range": None if g is None else {"start": g[0], "end": g[1]}, "message": self.message}


class HostWriteKind(str, Enum):
    """What a host write of a step writes."""

    DATA = "data"
    COW = "cow"
    ZERO = "zero"
    L1 = "L1"
    L2 = "L2"
    REFBLOCK = "refblock"
    REFTABLE = "reftable"
    HEADER = "header"


@dataclass(frozen=True)
class HostWrite:
    """One write to the image file."""

    offset: int
    length: int
    what: HostWriteKind

    def to_json(self) -> dict:
        return {"offset": self.offset, "length": self.length, "what": self.what.value}


@dataclass(frozen=True)
class Allocation:
    offset: int
    length: int
    what: str  # "data", "L2 table", "refcount block", "compressed data"...

    def to_json(self) -> dict:
        return {"offset": self.offset, "length": self.length, "what": self.what}


@dataclass(frozen=True)
class WritePlan:
    command: str
    line: int
    requests: tuple[Request, ...] = ()
    clusters: tuple[ClusterChange, ...] = ()
    host_writes: tuple[HostWrite, ...] = ()
    allocations: tuple[Allocation, ...] = ()
    frees: tuple[Region, ...] = ()  # host ranges whose refcount dropped
    hazards: tuple[Hazard, ...] = ()
    error: str | None = None
    file_size_before: int = 0
    file_size_after: int = 0
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        return {"command": self.command, "line": self.line or None,
                "requests": [r.to_json() for r in self.requests],
                "clusters": [c.to_json() for c in self.clusters],
                "host-writes": [w.to_json() for w in self.host_writes],
                "allocations": [a.to_json() for a in self.allocations],
                "frees": [f.to_json() for f in self.frees],
                "hazards": [h.to_json() for h in self.hazards], "error": self.error,
                "file-size-before": self.file_size_before, "file-size-after": self.file_size_after,
                "notes": list(self.notes)}

    def to_text(self) -> str:
        out = [f"{self.command}" + (f"   (line {self.line})" if self.line else "")]
        for r in self.requests:
            out.append(f"  {r.kind.value} guest [0x{r.guest_offset:x}, +0x{r.length:x})"
                       + (f" -> host 0x{r.host_offset:x}" if r.host_offset is not None else "")
                       + (f": {r.outcome}" if r.outcome else ""))
            for m in r.metas:
                where = "in place" if m.keep_old else "new cluster"
                out.append(f"    L2Meta guest 0x{m.guest_offset:x} x{m.nb_clusters} {where} @0x{m.alloc_offset:x}"
                           f"  cow_start [0x{m.cow_start.offset:x},+0x{m.cow_start.length:x})"
                           f"  cow_end [0x{m.cow_end.offset:x},+0x{m.cow_end.length:x})"
                           + ("  (QEMU: skip_cow, zero-fills instead)" if m.skip_cow else ""))
                for s in m.sources:
                    out.append(f"      COW guest [0x{s.guest_offset:x},+0x{s.length:x}) from {s.label}")
        for c in self.clusters:
            out.append(f"  cluster {c.guest_cluster}: {c.bitmap_before} -> {c.bitmap_after}"
                       f"   (0x{c.word0_before:x}/{c.l2_bitmap_before:016x} -> 0x{c.word0_after:x}/{c.l2_bitmap_after:016x})")
        for a in self.allocations:
            out.append(f"  allocate {a.what} host [0x{a.offset:x}, +0x{a.length:x})")
        for f in self.frees:
            out.append(f"  free host [0x{f.offset:x}, +0x{f.length:x})")
        for w in self.host_writes:
            out.append(f"  W host [0x{w.offset:x}, +0x{w.length:x}) {w.what.value}")
        for n in self.notes:
            out.append(f"  note: {n}")
        for h in self.hazards:
            out.append(f"  HAZARD: {h.message}")
        if self.error:
            out.append(f"  error: {self.error}")
        return "\n".join(out)
