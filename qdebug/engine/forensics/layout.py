"""Host layout: who owns every host cluster of a qcow2 file, and what is wrong with the ownership.

Every structure QEMU's `check` walks (header, active and snapshot L1 tables, their L2 tables and
data or compressed clusters, the refcount table and blocks, the snapshot table, bitmap directory,
tables and data) claims its host clusters in per-cluster arrays (kind, owner, snapshot), one whole
batch of L2 tables at a time (preadv into reused buffers, as the checker does). A cluster claimed
twice is an `overlap` unless the two claims are a legitimate share (the same guest cluster's data,
or the same L2 table, in the active L1 and a snapshot; compressed clusters packed into one host
cluster). Unclaimed clusters are `free`, or `leaked` when their refcount is not 0; the non-zero
ones get a content guess (`guess.py`). References past the end of the file or not cluster aligned
claim nothing: they are listed as problems. The result keeps runs of equal kind (and continuing
owner), so a 1 TiB image is a few thousand runs, and answers "who owns host cluster N".

Stable API (the fleet scan builds on it): `host_layout(image) -> HostLayout`; `HostLayout.runs`
(numpy columns), `.owners(cluster)`, `.kind_of(cluster)`, `.problems`, `.summary()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterator

import numpy as np

from ..errors import QcowError
from ..file.chain import backing_warning
from ..file.image import read_snapshot_table
from ..format import constants as C
from ..format.bitmaps import BME_TABLE_ENTRY_OFFSET_MASK, bitmaps_extension, directory_entries
from ..format.refcounts import unpack_refcounts
from ..read.l2tables import readahead
from .guess import GUESS_NAMES, Guess, guess_clusters, with_data
from .source import ImageFile, native, open_file

_U64 = np.uint64
_BATCH_TABLES = 64
_RUN_CHUNK = 1 << 20  # clusters per pass when cutting runs (bounded temporaries)


class HostKind(IntEnum):
    FREE = 0
    HEADER = 1
    L1 = 2
    L2 = 3
    REFCOUNT_TABLE = 4
    REFCOUNT_BLOCK = 5
    SNAPSHOT_TABLE = 6
    BITMAP_DIRECTORY = 7
    BITMAP_TABLE = 8
    BITMAP_DATA = 9
    DATA = 10
    COMPRESSED = 11
    LEAKED = 12
    OVERLAP = 13


KIND_NAMES = ("free", "header", "l1", "l2", "refcount-table", "refcount-block", "snapshot-table",
              "bitmap-directory", "bitmap-table", "bitmap-data", "data", "compressed", "leaked", "overlap")
METADATA_KINDS = frozenset({HostKind.HEADER, HostKind.L1, HostKind.L2, HostKind.REFCOUNT_TABLE,
                            HostKind.REFCOUNT_BLOCK, HostKind.SNAPSHOT_TABLE, HostKind.BITMAP_DIRECTORY,
                            HostKind.BITMAP_TABLE})
# Kinds whose owner counts up along a run (guest cluster, L1 index, refcount table index).
_STEP = np.zeros(len(HostKind), dtype=np.int64)
_STEP[[HostKind.DATA, HostKind.L2, HostKind.REFCOUNT_BLOCK]] = 1
_SHAREABLE = (HostKind.DATA, HostKind.L2)  # same owner from the active L1 and a snapshot: no overlap


class Problem(IntEnum):
    OVERLAP = 0  # two owners of one cluster (every claimant is in `HostLayout.overlaps`)
    PAST_EOF = 1  # a reference to a cluster at or past the end of the file
    UNALIGNED = 2  # a reference that is not cluster aligned


PROBLEM_NAMES = ("overlap", "past-eof", "unaligned")


@dataclass(frozen=True)
class Claims:
    """Columns of references: one row per reference (problems, and every claimant of an overlap).
    `owner` and `snapshot` mean what they mean in `HostLayout.runs`."""

    cluster: np.ndarray  # host cluster index (problems: -1 where only `offset` applies)
    offset: np.ndarray  # host byte offset referenced
    kind: np.ndarray  # HostKind of the claim
    owner: np.ndarray
    snapshot: np.ndarray  # -1 active, else index in the snapshot table
    problem: np.ndarray  # Problem (overlap rows: Problem.OVERLAP)

    def __len__(self) -> int:
        return len(self.cluster)

    @staticmethod
    def empty() -> "Claims":
        z = np.zeros(0, dtype=np.int64)
        return Claims(z, z, np.zeros(0, np.uint8), z, np.zeros(0, np.int32), np.zeros(0, np.uint8))


@dataclass(frozen=True)
class Runs:
    """Runs of host clusters of one kind, snapshot and guess whose owner continues (the next
    guest cluster, L1 index or refcount table index for data, L2 tables and refcount blocks; the
    same owner otherwise). `owner`: data, compressed: guest cluster; l2: L1 index; refcount-block:
    refcount table index; bitmap-*: bitmap index; l1: -1 (the snapshot column says whose);
    others -1."""

    start: np.ndarray  # first host cluster
    count: np.ndarray  # clusters
    kind: np.ndarray  # HostKind
    owner: np.ndarray  # owner of the first cluster
    snapshot: np.ndarray  # -1 active, else snapshot index (l1, l2, data, compressed)
    guess: np.ndarray  # Guess (free and leaked clusters with content)

    def __len__(self) -> int:
        return len(self.start)


@dataclass(frozen=True)
class Owner:
    """One owner of a host cluster, in words."""

    kind: str
    snapshot: str | None = None  # the snapshot's id; None: the active image
    guest_offset: int | None = None  # data, compressed
    l1_index: int | None = None  # l2
    refcount_table_index: int | None = None  # refcount-block
    bitmap: int | None = None  # bitmap-*
    compressed_offset: int | None = None  # compressed: the packed byte range
    compressed_length: int | None = None

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind}
        for k in ("snapshot", "guest_offset", "l1_index", "refcount_table_index", "bitmap", "compressed_offset",
                  "compressed_length"):
            v = getattr(self, k)
            if v is not None:
                out[k.replace("_", "-")] = v
        return out

    def describe(self) -> str:
        where = f" of snapshot {self.snapshot}" if self.snapshot is not None else ""
        if self.kind in ("data", "compressed"):
            extra = (f" [0x{self.compressed_offset:x}, +0x{self.compressed_length:x})"
                     if self.compressed_offset is not None else "")
            return f"{self.kind} of guest 0x{self.guest_offset:x}{where}{extra}"
        if self.kind == "l2":
            return f"L2 table of L1 index {self.l1_index}{where}"
        if self.kind == "l1":
            return f"L1 table{where or ' (active)'}"
        if self.kind == "refcount-block":
            return f"refcount block {self.refcount_table_index}"
        if self.bitmap is not None:
            return f"{self.kind} of bitmap {self.bitmap}"
        return self.kind


@dataclass(frozen=True)
class LayoutSummary:
    bytes_by_kind: dict[str, int]
    bytes_by_guess: dict[str, int]  # free and leaked clusters with content, by guess
    problems: dict[str, int]
    data_clusters: int
    data_runs: int  # host-contiguous runs of consecutive guest clusters: fragmentation
    image_end_offset: int  # end of the last cluster in use or with a non-zero refcount
    file_size: int
    compaction_win: int  # bytes a compacted copy would not need (the file minus clusters in use)

    def to_json(self) -> dict:
        return {"bytes-by-kind": self.bytes_by_kind, "bytes-by-guess": self.bytes_by_guess,
                "problems": self.problems, "data-clusters": self.data_clusters, "data-runs": self.data_runs,
                "image-end-offset": self.image_end_offset, "file-size": self.file_size,
                "compaction-win": self.compaction_win}


@dataclass(frozen=True)
class HostLayout:
    path: str
    cluster_size: int
    file_size: int
    nb_clusters: int
    runs: Runs
    problems: Claims  # past-EOF and unaligned references, one row each; one OVERLAP row per cluster
    overlaps: Claims  # every claimant of every overlapped cluster
    compressed: Claims  # every compressed descriptor: cluster=first host cluster, offset, owner, and
    compressed_length: np.ndarray  # ... its byte length (the descriptor's sectors), sorted by offset
    snapshot_ids: tuple[str, ...]
    refcounts_known: bool  # False: the refcount structure could not be read (no `leaked` then)
    notes: tuple[str, ...] = ()
    image_end_offset: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- questions ---------------------------------------------------------------------------
    def _run_of(self, cluster: int) -> int:
        i = int(np.searchsorted(self.runs.start, cluster, side="right")) - 1
        if i < 0 or cluster >= self.nb_clusters:
            raise IndexError(f"host cluster {cluster} is outside the file ({self.nb_clusters} clusters)")
        return i

    def cluster_kind(self, cluster: int) -> int:
        """HostKind of host cluster `cluster`."""
        return int(self.runs.kind[self._run_of(cluster)])

    def kind_of(self, cluster: int) -> str:
        return KIND_NAMES[int(self.runs.kind[self._run_of(cluster)])]

    def guess_of(self, cluster: int) -> str:
        return GUESS_NAMES[int(self.runs.guess[self._run_of(cluster)])]

    def owners(self, cluster: int) -> tuple[Owner, ...]:
        """Who owns host cluster `cluster` (several for an overlap or packed compressed clusters;
        none for free and leaked clusters)."""
        i = self._run_of(cluster)
        kind = int(self.runs.kind[i])
        if kind == HostKind.OVERLAP:
            o = self.overlaps.cluster
            sel = range(int(np.searchsorted(o, cluster)), int(np.searchsorted(o, cluster, side="right")))
            return tuple(self._owner(int(self.overlaps.kind[j]), int(self.overlaps.owner[j]),
                                     int(self.overlaps.snapshot[j])) for j in sel)
        if kind == HostKind.COMPRESSED:
            return self.compressed_in(cluster)
        if kind in (HostKind.FREE, HostKind.LEAKED):
            return ()
        owner = int(self.runs.owner[i]) + int(_STEP[kind]) * (cluster - int(self.runs.start[i]))
        return (self._owner(kind, owner, int(self.runs.snapshot[i])),)

    def compressed_in(self, cluster: int) -> tuple[Owner, ...]:
        """Every compressed cluster whose bytes lie (partly) in host cluster `cluster`."""
        c = self.compressed
        lo, hi = cluster * self.cluster_size, (cluster + 1) * self.cluster_size
        end = np.searchsorted(c.offset, hi)
        cand = np.arange(max(0, end - 4096), end)  # packed streams are short; a bounded look back
        cand = cand[c.offset[cand] + self.compressed_length[cand] > lo]
        return tuple(Owner("compressed", self._snap_id(int(c.snapshot[j])), guest_offset=int(c.owner[j]) *
                           self.cluster_size, compressed_offset=int(c.offset[j]),
                           compressed_length=int(self.compressed_length[j])) for j in cand)

    def _snap_id(self, snap: int) -> str | None:
        return None if snap < 0 else (self.snapshot_ids[snap] if snap < len(self.snapshot_ids) else str(snap))

    def _owner(self, kind: int, owner: int, snap: int) -> Owner:
        name, sid = KIND_NAMES[kind], self._snap_id(snap)
        if kind in (HostKind.DATA, HostKind.COMPRESSED):
            return Owner(name, sid, guest_offset=owner * self.cluster_size)
        if kind == HostKind.L2:
            return Owner(name, sid, l1_index=owner)
        if kind == HostKind.L1:
            return Owner(name, sid)
        if kind == HostKind.REFCOUNT_BLOCK:
            return Owner(name, refcount_table_index=owner)
        if kind in (HostKind.BITMAP_TABLE, HostKind.BITMAP_DATA):
            return Owner(name, bitmap=owner)
        return Owner(name)

    def cluster_kinds(self) -> np.ndarray:
        """Per host cluster kind (dense uint8 array; built on demand)."""
        k = self._cache.get("kinds")
        if k is None:
            k = self._cache["kinds"] = np.repeat(self.runs.kind, self.runs.count)
        return k

    def summary(self) -> LayoutSummary:
        r, cs = self.runs, self.cluster_size
        nbytes = r.count * cs
        if len(r) and self.nb_clusters * cs > self.file_size:  # the last cluster is partial
            nbytes = nbytes.copy()
            nbytes[-1] -= self.nb_clusters * cs - self.file_size
        by_kind = {KIND_NAMES[k]: int(nbytes[r.kind == k].sum()) for k in np.unique(r.kind).tolist()}
        content = (r.guess != Guess.NONE) & (r.guess != Guess.ZEROS)
        by_guess = {GUESS_NAMES[g]: int(nbytes[content & (r.guess == g)].sum())
                    for g in np.unique(r.guess[content]).tolist()}
        probs = {PROBLEM_NAMES[p]: int(n) for p, n in enumerate(np.bincount(self.problems.problem, minlength=3))
                 if n}
        data = r.kind == HostKind.DATA
        used = int(r.count[~np.isin(r.kind, (HostKind.FREE, HostKind.LEAKED))].sum())
        return LayoutSummary(by_kind, by_guess, probs, int(r.count[data].sum()), int(data.sum()),
                             self.image_end_offset, self.file_size, max(0, self.file_size - used * cs))

    # ---- output ------------------------------------------------------------------------------
    def run_json(self, i: int) -> dict:
        r, cs = self.runs, self.cluster_size
        kind = int(r.kind[i])
        out: dict = {"start": int(r.start[i]) * cs, "length": int(r.count[i]) * cs, "kind": KIND_NAMES[kind]}
        snap = self._snap_id(int(r.snapshot[i]))
        owner = int(r.owner[i])
        if kind in (HostKind.L1, HostKind.L2, HostKind.DATA) and snap is not None:
            out["snapshot"] = snap
        if kind == HostKind.DATA:
            out["guest-offset"] = owner * cs
        elif kind == HostKind.L2:
            out["l1-index"] = owner
        elif kind == HostKind.REFCOUNT_BLOCK:
            out["refcount-table-index"] = owner
        elif kind in (HostKind.BITMAP_TABLE, HostKind.BITMAP_DATA):
            out["bitmap"] = owner
        elif kind in (HostKind.COMPRESSED, HostKind.OVERLAP):
            first = int(r.start[i])
            owners: list[Owner] = []
            for c in range(first, first + int(r.count[i])):
                owners.extend(self.owners(c))
            out["owners"] = [o.to_json() for o in dict.fromkeys(owners)]
        if r.guess[i] != Guess.NONE:
            out["guess"] = GUESS_NAMES[int(r.guess[i])]
        return out

    def problem_json(self, j: int) -> dict:
        p = self.problems
        owner = self._owner(int(p.kind[j]), int(p.owner[j]), int(p.snapshot[j]))
        return {"problem": PROBLEM_NAMES[int(p.problem[j])], "offset": int(p.offset[j]), "owner": owner.to_json()}

    def problem_text(self, j: int) -> str:
        p = self.problems
        code, off = int(p.problem[j]), int(p.offset[j])
        if code == Problem.OVERLAP:
            owners = self.owners(int(p.cluster[j]))
            return f"overlap: host cluster 0x{off:x} is " + " and ".join(o.describe() for o in owners)
        owner = self._owner(int(p.kind[j]), int(p.owner[j]), int(p.snapshot[j])).describe()
        if code == Problem.PAST_EOF:
            return f"past-eof: {owner} at 0x{off:x}, past the end of the file (0x{self.file_size:x})"
        return f"unaligned: {owner} at 0x{off:x} is not cluster aligned"

    def iter_json(self) -> Iterator[str]:
        """The JSON document in pieces (runs and problems streamed; see layout_format)."""
        from .layout_format import iter_json

        return iter_json(self)


# ---- building --------------------------------------------------------------------------------
class _Claimer:
    """Per-cluster claim arrays and the references that claim nothing (problems)."""

    def __init__(self, nb: int, snapshots: bool):
        self.nb = nb
        self.kind = np.zeros(nb, dtype=np.uint8)
        self.owner = np.full(nb, -1, dtype=np.int64)
        self.snap = np.full(nb, -1, dtype=np.int32) if snapshots else None
        self._conf: list[tuple] = []
        self._prob: list[tuple] = []
        self._comp: list[tuple] = []

    def problem(self, code: int, offsets, kind: int, owner, snap: int) -> None:
        offsets = np.atleast_1d(np.asarray(offsets, dtype=np.int64))
        if offsets.size:
            self._prob.append((offsets, np.full(offsets.size, code, np.uint8), kind,
                               np.broadcast_to(np.asarray(owner, dtype=np.int64), offsets.shape), snap))

    def region(self, offset: int, length: int, kind: int, owner: int = -1, snap: int = -1, cs: int = 1) -> None:
        """Claim the clusters of a byte region (tables); unaligned or past-EOF starts are problems."""
        if length <= 0:
            return
        if offset % cs:
            self.problem(Problem.UNALIGNED, offset, kind, owner, snap)
            return
        first, last = offset // cs, (offset + length - 1) // cs
        if first >= self.nb:
            self.problem(Problem.PAST_EOF, offset, kind, owner, snap)
            return
        if last >= self.nb:  # the table's tail is missing
            self.problem(Problem.PAST_EOF, self.nb * cs, kind, owner, snap)
        self.claim(np.arange(first, min(last, self.nb - 1) + 1, dtype=np.int64), kind, owner, snap)

    def claim(self, cl: np.ndarray, kind: int, owner, snap: int = -1) -> None:
        """Clusters `cl` (inside the file) are `kind` of `owner` (scalar or per cluster)."""
        if cl.size == 0:
            return
        owner = np.broadcast_to(np.asarray(owner, dtype=np.int64), cl.shape)
        cur = self.kind[cl]
        prior = cur != HostKind.FREE
        if prior.any():
            p = np.flatnonzero(prior)
            pc = cl[p]
            if kind == HostKind.COMPRESSED:
                same = cur[p] == kind
            elif kind in _SHAREABLE:
                same = (cur[p] == kind) & (self.owner[pc] == owner[p])
            else:
                same = np.zeros(p.size, dtype=bool)
            bad = p[~same]
            if bad.size:
                self._conflict(cl[bad], kind, owner[bad], snap)
            fresh = np.flatnonzero(~prior)
            cl, owner = cl[fresh], owner[fresh]
            if cl.size == 0:
                return
        self.kind[cl] = kind
        self.owner[cl] = owner
        if self.snap is not None:
            self.snap[cl] = snap
        if kind != HostKind.COMPRESSED and cl.size > 1 and not (cl[1:] > cl[:-1]).all():
            lost = self.owner[cl] != owner  # one cluster twice in this very call: the last one won
            if lost.any():
                self._conflict(cl[lost], kind, owner[lost], snap)

    def _conflict(self, cl: np.ndarray, kind: int, owner: np.ndarray, snap: int) -> None:
        first = self.kind[cl] != HostKind.OVERLAP
        if first.any():
            c = cl[first]
            s = self.snap[c] if self.snap is not None else np.full(c.size, -1, np.int32)
            self._conf.append((c, self.kind[c].copy(), self.owner[c].copy(), s.copy()))
        self._conf.append((cl, np.full(cl.size, kind, np.uint8), owner, np.full(cl.size, snap, np.int32)))
        self.kind[cl] = HostKind.OVERLAP

    def compressed(self, guest: np.ndarray, coff: np.ndarray, nbytes: np.ndarray, snap: int, cs: int) -> None:
        self._comp.append((guest, coff, nbytes, snap))
        first = coff // cs
        past = first >= self.nb
        if past.any():
            self.problem(Problem.PAST_EOF, coff[past], HostKind.COMPRESSED, guest[past], snap)
        ok = ~past
        first, last, g = first[ok], np.minimum((coff[ok] + nbytes[ok] - 1) // cs, self.nb - 1), guest[ok]
        n = last - first + 1
        if (n == 1).all():
            self.claim(first, HostKind.COMPRESSED, g, snap)
            return
        idx = np.repeat(first, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        self.claim(idx, HostKind.COMPRESSED, np.repeat(g, n), snap)

    # results
    def overlaps(self) -> Claims:
        if not self._conf:
            return Claims.empty()
        cl = np.concatenate([c[0] for c in self._conf])
        kind = np.concatenate([c[1] for c in self._conf])
        owner = np.concatenate([c[2] for c in self._conf])
        snap = np.concatenate([c[3] for c in self._conf])
        rows = np.unique(np.stack([cl, kind.astype(np.int64), owner, snap.astype(np.int64)], axis=1), axis=0)
        n = len(rows)
        return Claims(rows[:, 0].copy(), rows[:, 0] * 0, rows[:, 1].astype(np.uint8), rows[:, 2].copy(),
                      rows[:, 3].astype(np.int32), np.full(n, Problem.OVERLAP, np.uint8))

    def problems(self, overlaps: Claims, cs: int) -> Claims:
        parts = [(np.full(len(o), -1, np.int64), o, np.full(len(o), k, np.uint8), w, np.full(len(o), s, np.int32), p)
                 for o, p, k, w, s in self._prob]
        oc = np.unique(overlaps.cluster)
        if oc.size:
            first = np.searchsorted(overlaps.cluster, oc)
            parts.append((oc, oc * cs, overlaps.kind[first], overlaps.owner[first], overlaps.snapshot[first],
                          np.full(oc.size, Problem.OVERLAP, np.uint8)))
        if not parts:
            return Claims.empty()
        cols = [np.concatenate([p[i] for p in parts]) for i in range(6)]
        order = np.argsort(cols[1], kind="stable")
        return Claims(*(c[order] for c in cols))

    def compressed_claims(self, cs: int) -> tuple[Claims, np.ndarray]:
        if not self._comp:
            return Claims.empty(), np.zeros(0, np.int64)
        g = np.concatenate([c[0] for c in self._comp])
        off = np.concatenate([c[1] for c in self._comp])
        nbytes = np.concatenate([c[2] for c in self._comp])
        snap = np.concatenate([np.full(len(c[0]), c[3], np.int32) for c in self._comp])
        order = np.argsort(off, kind="stable")
        n = len(g)
        return (Claims(off[order] // cs, off[order], np.full(n, HostKind.COMPRESSED, np.uint8), g[order], snap[order],
                       np.zeros(n, np.uint8)), nbytes[order])


class _Walk:
    """One layout run over an ImageFile."""

    def __init__(self, f: ImageFile):
        self.f = f
        fl = f.header
        self.fl = fl
        self.cs = fl.cluster_size
        self.cb = fl.cluster_bits
        self.nb = f.nb_clusters
        self.notes: list[str] = []
        try:
            self.snaps = read_snapshot_table(f.pread, f.file_size, fl.snapshots_offset, fl.nb_snapshots,
                                             tolerant=True) if fl.nb_snapshots else []
        except QcowError:
            self.snaps = []
        if len(self.snaps) < fl.nb_snapshots:
            self.notes.append(f"snapshot table: only {len(self.snaps)} of {fl.nb_snapshots} entries could be read")
        self.c = _Claimer(self.nb, bool(self.snaps))
        outside = backing_warning(f.path, fl.backing_file)
        if outside:
            self.notes.append(outside)
        self._seen_tables: set[tuple[int, int]] = set()

    def run(self) -> None:
        self.c.region(0, self.cs, HostKind.HEADER, cs=self.cs)
        self.l1(self.fl.l1_table_offset, self.fl.l1_size, -1)
        if self.snaps:
            sn_end = self.snaps[-1].offset + self.snaps[-1].entry_size
            self.c.region(self.fl.snapshots_offset, sn_end - self.fl.snapshots_offset, HostKind.SNAPSHOT_TABLE,
                          cs=self.cs)
        for sn in self.snaps:
            self.l1(sn.l1_table_offset, sn.l1_size, sn.index)
        self.bitmaps()

    # L1 and L2 tables
    def l1(self, offset: int, size: int, snap: int) -> None:
        if not size:
            return
        cap = C.QCOW_MAX_L1_SIZE // 8
        if size > cap:
            self.notes.append(f"{'active' if snap < 0 else 'snapshot'} L1 table: l1_size {size} is above QEMU's "
                              f"limit; only the first {cap} entries are mapped")
            size = cap
        self.c.region(offset, size * 8, HostKind.L1, snap, snap, cs=self.cs)
        if offset % self.cs or offset >= self.f.file_size:
            return
        l1 = self.f.u64(offset, size)
        used = np.flatnonzero(l1 & _U64(C.L1E_OFFSET_MASK))
        if used.size == 0:
            return
        l2 = (l1[used] & _U64(C.L1E_OFFSET_MASK)).astype(np.int64)
        unal = (l2 % self.cs) != 0
        self.c.problem(Problem.UNALIGNED, l2[unal], HostKind.L2, used[unal], snap)
        cl = l2 >> self.cb
        past = ~unal & (cl >= self.nb)
        self.c.problem(Problem.PAST_EOF, l2[past], HostKind.L2, used[past], snap)
        ok = ~unal & ~past
        self.c.claim(cl[ok], HostKind.L2, used[ok], snap)
        idx, offs = used[ok], l2[ok]
        fresh = [k for k, pair in enumerate(zip(idx.tolist(), offs.tolist())) if pair not in self._seen_tables]
        self._seen_tables.update(zip(idx[fresh].tolist(), offs[fresh].tolist()))
        self.l2_tables(idx[fresh], offs[fresh], snap)

    def l2_tables(self, l1_idx: np.ndarray, offs: np.ndarray, snap: int) -> None:
        fl, cs, cb = self.fl, self.cs, self.cb
        n = fl.l2_entries
        words = n * (2 if fl.extended_l2 else 1)
        rows = min(_BATCH_TABLES, len(offs))
        if rows == 0:
            return
        buf = np.empty((rows, words), dtype=np.uint64)
        x = 62 - (cb - 8)
        col = np.arange(n, dtype=np.int64)
        odd = _U64(C.QCOW_OFLAG_COMPRESSED | ((cs - 1) & C.L2E_OFFSET_MASK))
        ahead = _BATCH_TABLES * 4  # tables announced to the kernel before they are read (cold caches)
        readahead(self.f, offs[:ahead].tolist(), cs)
        for b in range(0, len(offs), _BATCH_TABLES):
            readahead(self.f, offs[b + ahead:b + ahead + _BATCH_TABLES].tolist(), cs)
            bo, bi = offs[b:b + _BATCH_TABLES], l1_idx[b:b + _BATCH_TABLES]
            raw = buf[:len(bo)]
            for k, o in enumerate(bo.tolist()):
                self.f.read_into(raw[k], o)
            native(raw)
            w0 = raw[:, 0::2] if fl.extended_l2 else raw
            nz = w0 != 0
            count = int(np.count_nonzero(nz))
            if count == 0:
                continue
            if count == nz.size:  # every entry used (preallocated): no index arrays needed
                w = w0.ravel()
                g = (bi[:, None] * n + col).ravel()
            else:
                rr, cc = np.nonzero(nz)
                w = w0[rr, cc]
                g = bi[rr] * n + col[cc]
            if not (w & odd).any():  # the common case: plain, aligned data clusters
                cl = ((w & _U64(C.L2E_OFFSET_MASK)) >> _U64(cb)).astype(np.int64)
                if int(cl.max()) < self.nb:
                    keep = cl != 0
                    self.c.claim(cl if keep.all() else cl[keep], HostKind.DATA, g if keep.all() else g[keep], snap)
                    continue
            comp = (w & _U64(C.QCOW_OFLAG_COMPRESSED)) != 0
            off = (w & _U64(C.L2E_OFFSET_MASK)).astype(np.int64)
            has = ~comp & (off != 0)
            unal = has & ((off & (cs - 1)) != 0)
            cl = off >> cb
            past = has & ~unal & (cl >= self.nb)
            if unal.any():
                self.c.problem(Problem.UNALIGNED, off[unal], HostKind.DATA, g[unal], snap)
            if past.any():
                self.c.problem(Problem.PAST_EOF, off[past], HostKind.DATA, g[past], snap)
            ok = has & ~unal & ~past
            self.c.claim(cl[ok], HostKind.DATA, g[ok], snap)
            if comp.any():
                cw = w[comp]
                coff = (cw & _U64((1 << x) - 1)).astype(np.int64)
                nsec = ((cw >> _U64(x)) & _U64((1 << (cb - 8)) - 1)).astype(np.int64) + 1
                self.c.compressed(g[comp], coff, nsec * 512 - (coff & 511), snap, cs)

    # refcounts
    def refcounts(self) -> np.ndarray | None:
        """Claim the refcount table and blocks; return which clusters have a non-zero refcount."""
        fl, cs = self.fl, self.cs
        rt_off, rt_clusters = fl.refcount_table_offset, fl.refcount_table_clusters
        if rt_clusters * cs > C.QCOW_MAX_REFTABLE_SIZE:
            self.notes.append(f"refcount table: {rt_clusters} clusters is above QEMU's limit; only "
                              f"{C.QCOW_MAX_REFTABLE_SIZE} bytes of it are mapped")
            rt_clusters = C.QCOW_MAX_REFTABLE_SIZE // cs
        self.c.region(rt_off, rt_clusters * cs, HostKind.REFCOUNT_TABLE, cs=cs)
        if not rt_clusters or rt_off % cs or rt_off >= self.f.file_size:
            self.notes.append("refcount table unreadable (offset unaligned or past the end of the file): "
                              "leaked clusters cannot be told from free ones")
            return None
        rt = self.f.u64(rt_off, rt_clusters * cs // 8)
        used = np.flatnonzero(rt)
        offs = (rt[used] & _U64(C.REFT_OFFSET_MASK)).astype(np.int64)
        unal = (offs % cs) != 0
        self.c.problem(Problem.UNALIGNED, offs[unal], HostKind.REFCOUNT_BLOCK, used[unal], -1)
        past = ~unal & ((offs >> self.cb) >= self.nb)
        self.c.problem(Problem.PAST_EOF, offs[past], HostKind.REFCOUNT_BLOCK, used[past], -1)
        ok = ~unal & ~past
        self.c.claim(offs[ok] >> self.cb, HostKind.REFCOUNT_BLOCK, used[ok], -1)
        if not self.f.reading.refcounts_readable:
            self.notes.append("refcount_order is above 6: refcounts unreadable, leaked clusters cannot be told "
                              "from free ones")
            return None
        per = fl.refcount_block_entries
        nonzero = np.zeros(self.nb, dtype=bool)
        for i, o in zip(used[ok].tolist(), offs[ok].tolist()):
            lo = i * per
            if lo >= self.nb:
                continue
            vals = unpack_refcounts(self.f.pread(o, cs), fl.refcount_order)
            hi = min(self.nb, lo + per)
            nonzero[lo:hi] = vals[:hi - lo] != 0
        return nonzero

    # bitmaps
    def bitmaps(self) -> None:
        ext = bitmaps_extension(self.fl)
        if not ext or not ext[0]:
            return
        nb, dir_size, dir_off = ext
        self.c.region(dir_off, dir_size, HostKind.BITMAP_DIRECTORY, cs=self.cs)
        entries, truncated = directory_entries(self.f.pread(dir_off, min(dir_size, 1 << 26)), nb)
        if truncated:
            self.notes.append(f"bitmap directory at 0x{dir_off:x} is truncated: {len(entries)} of {nb} bitmaps mapped")
        for e in entries:
            self.c.region(e.table_offset, e.table_size * 8, HostKind.BITMAP_TABLE, e.index, cs=self.cs)
            if not e.table_size or e.table_offset % self.cs or e.table_offset >= self.f.file_size:
                continue
            t = self.f.u64(e.table_offset, min(e.table_size, 1 << 24)) & _U64(BME_TABLE_ENTRY_OFFSET_MASK)
            t = t[t != 0].astype(np.int64)
            unal = (t % self.cs) != 0
            self.c.problem(Problem.UNALIGNED, t[unal], HostKind.BITMAP_DATA, e.index, -1)
            past = ~unal & ((t >> self.cb) >= self.nb)
            self.c.problem(Problem.PAST_EOF, t[past], HostKind.BITMAP_DATA, e.index, -1)
            ok = ~unal & ~past
            self.c.claim(t[ok] >> self.cb, HostKind.BITMAP_DATA, e.index, -1)


def _cut_runs(kind: np.ndarray, owner: np.ndarray, snap: np.ndarray | None, guess: np.ndarray) -> Runs:
    """Runs over the dense per-cluster arrays, chunk by chunk (bounded temporaries)."""
    nb = len(kind)
    starts: list[np.ndarray] = []
    for a in range(0, nb, _RUN_CHUNK):
        b = min(nb, a + _RUN_CHUNK)
        lo = max(0, a - 1)
        k, o, g = kind[lo:b], owner[lo:b], guess[lo:b]
        brk = (k[1:] != k[:-1]) | (o[1:] != o[:-1] + _STEP[k[1:]]) | (g[1:] != g[:-1])
        if snap is not None:
            s = snap[lo:b]
            brk |= s[1:] != s[:-1]
        heads = np.flatnonzero(brk) + lo + 1
        if a == 0:
            heads = np.r_[0, heads]
        starts.append(heads.astype(np.int64))
    start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    count = np.diff(np.r_[start, nb])
    sn = snap[start] if snap is not None else np.full(len(start), -1, np.int32)
    return Runs(start, count, kind[start], owner[start], sn, guess[start])


def host_layout(image, *, guesses: bool = True) -> HostLayout:
    """Classify every host cluster of `image` (a path, an `Image` or an `ImageFile`).

    `guesses`: look at the content of unreferenced clusters (reads them: proportional to the
    leaked and free space that holds data)."""
    f, own = open_file(image)
    try:
        w = _Walk(f)
        w.run()
        nonzero = w.refcounts()
        c = w.c
        kind = c.kind
        if nonzero is not None:
            kind[(kind == HostKind.FREE) & nonzero] = HostKind.LEAKED
        used = (kind != HostKind.FREE) if nonzero is None else ((kind != HostKind.FREE) | nonzero)
        end = (len(used) - int(np.argmax(used[::-1]))) * w.cs if used.any() else 0
        refcounts_known = nonzero is not None
        del nonzero, used
        guess = np.zeros(len(kind), dtype=np.uint8)
        if guesses and len(kind):
            cand = with_data(f.fd, np.flatnonzero((kind == HostKind.FREE) | (kind == HostKind.LEAKED)), w.cs)
            guess[cand] = guess_clusters(f, cand)
            guess[(kind == HostKind.LEAKED) & (guess == Guess.NONE)] = Guess.ZEROS  # a hole reads as zeros
            # a guess of zeros is no finding on a free cluster: only leaked ones keep it
            guess[(guess == Guess.ZEROS) & (kind == HostKind.FREE)] = Guess.NONE
        overlaps = c.overlaps()
        problems = c.problems(overlaps, w.cs)
        comp, comp_len = c.compressed_claims(w.cs)
        runs = _cut_runs(kind, c.owner, c.snap, guess)
        return HostLayout(f.path, w.cs, f.file_size, w.nb, runs, problems, overlaps, comp, comp_len,
                          tuple(s.id for s in w.snaps), refcounts_known, tuple(w.notes), end)
    finally:
        if own:
            f.close()
