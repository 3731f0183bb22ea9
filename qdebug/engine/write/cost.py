"""What a step costs, counted the way QEMU 7.2 spends it (issue #14; notes/stats-design.md).

From the plain data a step recorded as it ran (`StepTrace`: its L2Metas with the entries they
replaced, its host writes and metadata cache operations in order, its refcount transitions):

* guest bytes asked for (write, zero, discard) and host bytes written into data clusters (guest
  data plus COW; QEMU's zero-fills instead of an all-zero COW counted apart);
* cow-bytes, and the part of it that copies subclusters that were `-` or `0` and the write does not
  touch (cow-avoidable-bytes: the guest would read them the same had they been left alone);
* the bytes each COW read takes from this image, each backing file, or nowhere (zeros), including
  the data area QEMU reads along when the two COW regions are close (perform_cow's merged read);
* metadata bytes as `qemu-io -t writethrough` writes them: QEMU's two metadata caches replayed over
  the step's writes (a dirty L2 slice or refcount block is written whole, each time a flush or a
  cache dependency makes it go out), then flushed as the command ends;
* clusters whose refcount went from 0 to non-zero (data, L2 tables, refcount blocks), file sizes.

`measure` returns a `Cost` (plain, addable), or adds a step to one; `add_trace` runs a whole dry run
into one (`qdebug stats`: 100k steps, the loop compiled with the rest); `Cost.frozen()` is the
`StepCost` the step log and the TUI print.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Iterable

from ..errors import StorageError
from ..format.geometry import Geometry
from .ops import Command
from .plan import CowSource
from .step import StepTrace, cow_source
from .txn import FLUSH_L2, FLUSH_REFCOUNT, L2_AFTER_REFCOUNT, REFCOUNT_AFTER_L2
from .writer import WriteEngine

METADATA_KINDS: Final = ("L1", "L2", "refblock", "reftable", "header")
_CACHED: Final = frozenset({"L2", "refblock"})  # the rest is written directly (bdrv_pwrite_sync)


def source_label(kind: int, depth: int) -> str:
    """A COW read's source as the stats name it: this image, this image (compressed), backing depth N, zeros."""
    src = cow_source(kind, depth)
    if src is CowSource.OLD_CLUSTER:
        return "this image"
    if src is CowSource.DECOMPRESSED:
        return "this image (compressed)"
    if src is CowSource.ZEROS:
        return "zeros"
    return f"backing depth {depth}"


def json_key(label: str) -> str:
    """A source or metadata kind as a JSON key, kebab-case as every key qdebug writes:
    "backing depth 1" -> "backing-depth-1", "this image (compressed)" -> "this-image-compressed", "L2" -> "l2"."""
    return "-".join(label.lower().replace("(", " ").replace(")", " ").split())


class Cost:
    """Counters of one step (or, added up, of many). Plain and mutable: made once per step."""

    __slots__ = ("steps", "guest_write_bytes", "guest_zero_bytes", "guest_discard_bytes", "host_data_bytes",
                 "cow_bytes", "cow_avoidable_bytes", "zero_fill_bytes", "cow_read_bytes", "metadata",
                 "host_write_requests", "cow_read_requests", "allocated_clusters", "l2_tables_allocated",
                 "refcount_blocks_allocated", "file_size_before", "file_size_after")

    def __init__(self) -> None:
        self.steps = 0
        self.guest_write_bytes = self.guest_zero_bytes = self.guest_discard_bytes = 0
        self.host_data_bytes = self.cow_bytes = self.cow_avoidable_bytes = self.zero_fill_bytes = 0
        self.cow_read_bytes: dict[str, int] = {}
        self.metadata: dict[str, int] = {}
        self.host_write_requests = self.cow_read_requests = 0
        self.allocated_clusters = self.l2_tables_allocated = self.refcount_blocks_allocated = 0
        self.file_size_before = self.file_size_after = 0

    @property
    def metadata_bytes(self) -> int:
        return sum(self.metadata.values())

    def add(self, c: Cost) -> None:
        """Sum `c` into these counters (file-size-before stays the first step's, -after is the last's)."""
        if not self.steps:
            self.file_size_before = c.file_size_before
        self.steps += c.steps
        self.guest_write_bytes += c.guest_write_bytes
        self.guest_zero_bytes += c.guest_zero_bytes
        self.guest_discard_bytes += c.guest_discard_bytes
        self.host_data_bytes += c.host_data_bytes
        self.cow_bytes += c.cow_bytes
        self.cow_avoidable_bytes += c.cow_avoidable_bytes
        self.zero_fill_bytes += c.zero_fill_bytes
        for k, v in c.cow_read_bytes.items():
            self.cow_read_bytes[k] = self.cow_read_bytes.get(k, 0) + v
        for k, v in c.metadata.items():
            self.metadata[k] = self.metadata.get(k, 0) + v
        self.host_write_requests += c.host_write_requests
        self.cow_read_requests += c.cow_read_requests
        self.allocated_clusters += c.allocated_clusters
        self.l2_tables_allocated += c.l2_tables_allocated
        self.refcount_blocks_allocated += c.refcount_blocks_allocated
        self.file_size_after = c.file_size_after

    def frozen(self) -> StepCost:
        return StepCost(
            self.guest_write_bytes, self.guest_zero_bytes, self.guest_discard_bytes, self.host_data_bytes,
            self.cow_bytes, self.cow_avoidable_bytes, self.zero_fill_bytes,
            tuple(sorted(self.cow_read_bytes.items(), key=_source_order)),
            tuple((k, self.metadata[k]) for k in METADATA_KINDS if self.metadata.get(k)),
            self.host_write_requests, self.cow_read_requests, self.allocated_clusters, self.l2_tables_allocated,
            self.refcount_blocks_allocated, self.file_size_before, self.file_size_after, self.steps)


def _source_order(item: tuple[str, int]) -> tuple[int, str]:
    k = item[0]
    return (0 if k.startswith("this image") else 2 if k == "zeros" else 1, k)


@dataclass(frozen=True)
class StepCost:
    """What a step (or a whole trace: `steps` > 1) cost. Bytes unless named otherwise."""

    guest_write_bytes: int
    guest_zero_bytes: int
    guest_discard_bytes: int
    host_data_bytes: int  # into data clusters: guest data + COW (QEMU's zero-fills excluded)
    cow_bytes: int
    cow_avoidable_bytes: int  # COW of `-`/`0` subclusters the write does not touch
    zero_fill_bytes: int  # write-zeroes QEMU issues instead of an all-zero COW (skip_cow)
    cow_read_bytes: tuple[tuple[str, int], ...]  # by source: this image, backing depth N, zeros
    metadata: tuple[tuple[str, int], ...]  # by kind (L1, L2, refblock, reftable, header), as writethrough writes
    host_write_requests: int
    cow_read_requests: int
    allocated_clusters: int  # data clusters whose refcount went 0 -> non-zero
    l2_tables_allocated: int
    refcount_blocks_allocated: int
    file_size_before: int
    file_size_after: int
    steps: int = 1

    @property
    def metadata_bytes(self) -> int:
        return sum(n for _k, n in self.metadata)

    @property
    def host_bytes(self) -> int:
        """Everything written to the image file but zero-fills: data, COW, metadata."""
        return self.host_data_bytes + self.metadata_bytes

    @property
    def write_amplification(self) -> float | None:
        """Host bytes written per guest byte written (None when the guest wrote nothing)."""
        return self.host_bytes / self.guest_write_bytes if self.guest_write_bytes else None

    @property
    def data_amplification(self) -> float | None:
        return self.host_data_bytes / self.guest_write_bytes if self.guest_write_bytes else None

    @property
    def avoidable_share(self) -> float | None:
        """The share of COW bytes that were avoidable (None without COW)."""
        return self.cow_avoidable_bytes / self.cow_bytes if self.cow_bytes else None

    def to_json(self) -> dict:
        def ratio(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {"guest-write-bytes": self.guest_write_bytes, "guest-zero-bytes": self.guest_zero_bytes,
                "guest-discard-bytes": self.guest_discard_bytes, "host-data-bytes": self.host_data_bytes,
                "cow-bytes": self.cow_bytes, "cow-avoidable-bytes": self.cow_avoidable_bytes,
                "zero-fill-bytes": self.zero_fill_bytes,
                "cow-read-bytes": {json_key(k): v for k, v in self.cow_read_bytes},
                "metadata-bytes": self.metadata_bytes, "metadata": {json_key(k): v for k, v in self.metadata},
                "host-write-requests": self.host_write_requests, "cow-read-requests": self.cow_read_requests,
                "allocated-clusters": self.allocated_clusters, "l2-tables-allocated": self.l2_tables_allocated,
                "refcount-blocks-allocated": self.refcount_blocks_allocated,
                "file-size-before": self.file_size_before, "file-size-after": self.file_size_after,
                "write-amplification": ratio(self.write_amplification),
                "data-amplification": ratio(self.data_amplification),
                "avoidable-share": ratio(self.avoidable_share)}


# ---- measuring one step ----------------------------------------------------------------------------
def measure(trace: StepTrace, geo: Geometry, into: Cost | None = None) -> Cost:
    """The step's cost; with `into`, added to those counters (a trace's total: no Cost per step)."""
    c = Cost() if into is None else into
    if not c.steps:
        c.file_size_before = trace.file_size_before
    c.steps += 1
    c.file_size_after = trace.file_size_after
    cmd = trace.command
    if cmd.op == "write":
        if cmd.zero:
            c.guest_zero_bytes += cmd.length
        else:
            c.guest_write_bytes += cmd.length
    elif cmd.op == "discard":
        c.guest_discard_bytes += cmd.length
    writes = trace.writes
    if not writes:
        return c
    data = 0
    for _off, n, what in writes:
        if what == "data" or what == "cow":
            data += n
    reads = c.cow_read_bytes
    wreq = rreq = 0
    for kind, _off, _n, _outcome, host, metas in trace.requests:
        if not metas:
            if kind == "compressed" and host is not None:
                wreq += 1
            continue
        wreq += 1  # the data write (with the COW when merged)
        for m in metas:
            regions = m.cow_regions()
            if m.skip:
                span = sum(b - a for a, b, _s in regions)
                data -= span  # recorded as COW, but QEMU zero-fills it: not data
                c.zero_fill_bytes += span if m.regions is not None else m.ce_to - m.cs_from
                wreq += 1
                continue
            if not regions:
                continue
            for a, b, _s in regions:
                c.cow_bytes += b - a
                if m.regions is None and not m.merged or m.regions is not None and a != m.ce_from and b != m.cs_to:
                    wreq += 1  # a COW write of its own
            if geo.ext:
                for _i, mask in m.avoidable(geo):
                    c.cow_avoidable_bytes += bin(mask).count("1") * geo.sc_size
            if m.mid is not None and m.regions is None:
                rreq += 1
                _count_reads(reads, m.segs[0])
                _count_reads(reads, m.mid)
                _count_reads(reads, m.segs[1])
            else:
                for _a, _b, segs in regions:
                    rreq += 1
                    _count_reads(reads, segs)
    c.host_data_bytes += data
    c.host_write_requests += wreq + writethrough_metadata(writes, trace.ops, geo.slice_entries * geo.esize, geo.cs,
                                                          c.metadata)
    c.cow_read_requests += rreq
    _allocations(c, trace, geo)
    return c


def add_trace(engine: WriteEngine, commands: Iterable[Command], total: Cost, failures: list[tuple[Command, str]],
              first: int = 0) -> int:
    """Run `commands` on a dry-run (SIMULATE) `engine` from step index `first` and add each step's
    cost to `total`; the commands QEMU fails too go to `failures` with their error (a storage error
    reading the image fails the command, as qemu-io's does). Returns the number of commands run."""
    geo = engine.geo
    n = first
    for cmd in commands:
        try:
            trace = engine.run(cmd, n).trace
        except StorageError as e:
            trace = StepTrace(cmd, geo.ext, [], engine.chain.top.file_size)
            trace.error = f"{cmd.failure_name} failed: {e.strerror}"
        n += 1
        if trace.error and not cmd.asynchronous:
            failures.append((cmd, trace.error))
        if cmd.changes_image:
            measure(trace, geo, total)
    return n - first


def _count_reads(reads: dict[str, int], segs: list) -> None:
    for s, e, kind, depth, _h in segs:
        label = source_label(kind, depth)
        reads[label] = reads.get(label, 0) + e - s


def _allocations(c: Cost, trace: StepTrace, geo: Geometry) -> None:
    """Host clusters whose refcount went from 0 to non-zero in the step, by what they became."""
    tr = trace.transitions
    if not tr and not trace.new_refblocks:
        return
    if all(t >= 0 for t in tr):
        fresh = set(tr)
    else:
        first: dict[int, bool] = {}  # cluster -> it was 0 before the step
        now: dict[int, bool] = {}  # cluster -> non-zero after it
        for t in tr:
            ci = t if t >= 0 else ~t
            if ci not in first:
                first[ci] = t >= 0
            now[ci] = t >= 0
        fresh = {ci for ci, was_zero in first.items() if was_zero and now[ci]}
    cb = geo.cbits
    l2 = {off >> cb for off, _n, what in trace.allocations if what == "L2 table"} & fresh
    blocks = {off >> cb for off in trace.new_refblocks}
    c.l2_tables_allocated += len(l2)
    c.refcount_blocks_allocated += len(blocks)
    c.allocated_clusters += len(fresh - l2 - blocks)


# ---- QEMU's metadata caches, write-through ----------------------------------------------------------
class _Caches:
    """qcow2-cache.c's two caches as far as bytes go: dirty entries, the one dependency, flushes."""

    __slots__ = ("l2", "rc", "l2_waits", "rc_waits", "slice", "cs", "out", "requests")

    def __init__(self, slice_bytes: int, cs: int, out: dict[str, int]):
        self.l2: dict[int, None] = {}  # dirty L2 slices (host offset), in the order they got dirty
        self.rc: dict[int, None] = {}  # dirty refcount blocks
        self.l2_waits = False  # l2->depends == refcount cache
        self.rc_waits = False  # refcount->depends == L2 cache
        self.slice, self.cs = slice_bytes, cs
        self.out = out  # bytes by kind, added to
        self.requests = 0

    def _write(self, what: str, n: int) -> None:
        self.out[what] = self.out.get(what, 0) + n
        self.requests += 1

    def flush_l2(self) -> None:
        for e in list(self.l2):
            if e in self.l2:
                if self.l2_waits:  # qcow2_cache_flush_dependency
                    self.l2_waits = False
                    self.flush_rc()
                del self.l2[e]
                self._write("L2", self.slice)

    def flush_rc(self) -> None:
        for e in list(self.rc):
            if e in self.rc:
                if self.rc_waits:
                    self.rc_waits = False
                    self.flush_l2()
                del self.rc[e]
                self._write("refblock", self.cs)

    def op(self, op: int) -> None:
        if op == FLUSH_L2:
            self.flush_l2()
        elif op == FLUSH_REFCOUNT:
            self.flush_rc()
        elif op == L2_AFTER_REFCOUNT:  # qcow2_cache_set_dependency(l2, refcount)
            if self.rc_waits:
                self.rc_waits = False
                self.flush_l2()
            self.l2_waits = True
        elif op == REFCOUNT_AFTER_L2:
            if self.l2_waits:
                self.l2_waits = False
                self.flush_rc()
            self.rc_waits = True


def writethrough_metadata(writes: list[tuple[int, int, str]], ops: list[tuple[int, int]], slice_bytes: int,
                          cs: int, out: dict[str, int]) -> int:
    """Metadata bytes by kind (added to `out`) of a step's writes as QEMU's caches write them
    through, and the number of write requests: every L2 / refblock write dirties the slice / block
    it falls in, the recorded cache operations flush and order them, and the command ends with
    qcow2_write_caches (L2, then refcounts). Assumes the caches hold every entry the step dirties
    (no eviction in a step)."""
    kind = 0
    for _i, op in ops:
        if op == FLUSH_L2 or op == FLUSH_REFCOUNT or (kind and op != kind):
            break
        kind = op
    else:  # no flush and no two-way dependency in the step (nearly every step): no entry goes out twice
        return _written_once(writes, slice_bytes, cs, out)
    caches: _Caches | None = None
    j = 0
    nops = len(ops)
    for i, (off, n, what) in enumerate(writes):
        if what == "data" or what == "cow" or what == "zero":
            continue
        if caches is None:
            caches = _Caches(slice_bytes, cs, out)
        while j < nops and ops[j][0] <= i:
            caches.op(ops[j][1])
            j += 1
        if what == "L2":
            for s in range(off // slice_bytes, (off + n - 1) // slice_bytes + 1):
                caches.l2[s * slice_bytes] = None
        elif what == "refblock":
            for b in range(off // cs, (off + n - 1) // cs + 1):
                caches.rc[b * cs] = None
        else:
            caches._write(what, n)
    if caches is None:
        return 0
    while j < nops:
        caches.op(ops[j][1])
        j += 1
    caches.flush_l2()
    caches.flush_rc()
    return caches.requests


def _written_once(writes: list[tuple[int, int, str]], slice_bytes: int, cs: int, out: dict[str, int]) -> int:
    """`writethrough_metadata` of a step whose cache operations never flush mid-step (dependencies
    one way only): every L2 slice and refcount block it dirties is written once as the command
    ends, and other metadata as it comes. Counted without the cache model (no set for the usual
    one slice and one block)."""
    requests = 0
    l2_one = rc_one = -1
    l2_more: set[int] | None = None
    rc_more: set[int] | None = None
    for off, n, what in writes:
        if what == "data" or what == "cow" or what == "zero":
            continue
        if what == "L2":
            for s in range(off // slice_bytes, (off + n - 1) // slice_bytes + 1):
                if l2_one < 0:
                    l2_one = s
                elif s != l2_one:
                    if l2_more is None:
                        l2_more = {l2_one}
                    l2_more.add(s)
        elif what == "refblock":
            for b in range(off // cs, (off + n - 1) // cs + 1):
                if rc_one < 0:
                    rc_one = b
                elif b != rc_one:
                    if rc_more is None:
                        rc_more = {rc_one}
                    rc_more.add(b)
        else:
            out[what] = out.get(what, 0) + n
            requests += 1
    l2_n = len(l2_more) if l2_more is not None else 1 if l2_one >= 0 else 0
    rc_n = len(rc_more) if rc_more is not None else 1 if rc_one >= 0 else 0
    if l2_n:
        out["L2"] = out.get("L2", 0) + l2_n * slice_bytes
    if rc_n:
        out["refblock"] = out.get("refblock", 0) + rc_n * cs
    return requests + l2_n + rc_n
