"""Salvage analysis: what each guest byte of one qcow2 layer is, using only what can be validated.

The rules, in the order they are applied:
* Refcounts are evidence, never needed to read: they tell leaked clusters (refcount > 0, no
  reference) from stale ones, and only when the refcount structure holds together (the header
  cluster has a refcount).
* Metadata is what the header, the snapshot table and the validated tables say it is: header,
  refcount table and the blocks it names that look like refcount blocks, snapshot table, every
  L1 and every L2 table that passes validation. Data pointing into metadata is not data.
* The active L1 table comes from the header when its offset and content are possible, otherwise
  from the file's content: the one cluster-aligned table of valid pointers to clusters that look
  like L2 tables (snapshot L1 tables excluded; several different candidates: none is trusted).
* An L2 table is validated as a whole (validate.py): two impossible entries (or one among few)
  and it is not an L2 table, so its whole guest range is lost, zeros included. An all-zero table
  while unreferenced guest data exists may have lost its entries: lost.
* An entry is trusted only if possible, inside the file where it needs its data, not pointing
  into metadata, and not sharing its host cluster with another guest cluster (both are lost then:
  which one owns it is unknown). Snapshot tables count here, as they are metadata and witnesses.
* Orphans (unreferenced clusters that look like L2 tables, with data nobody else references)
  go into an empty L1 slot only when that is unambiguous: a snapshot L1 or L2 table witnesses
  the slot, or one live (leaked: refcount > 0) orphan meets one empty slot. Otherwise they are
  reported unplaced and the empty slots they may belong to are lost, not zero.
The result is a `LayerMap`: guest runs with a status (data, compressed, zero, fall through to the
backing file, lost) and a reason for every lost byte, plus the orphans and what was done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import QcowError
from ..file.image import read_snapshot_table
from ..format import constants as C
from ..format.refcounts import unpack_refcounts
from ..format.subclusters import SubclusterType as T
from ..read.status import cluster_units
from .guess import Guess, guess_clusters, guess_rows, with_data
from .source import ImageFile, native
from .validate import REASON_TEXT, Reason, l1_rejected, l1_verdict, l2_verdict, table_rejected

_U64 = np.uint64
_BATCH = 64  # L2 tables per read batch
_SCAN_BYTES = 8 << 20  # file bytes per pass of the L1 search

# Guest run statuses.
S_DATA, S_COMPRESSED, S_ZERO, S_FALL, S_LOST = 0, 1, 2, 3, 4
STATUS_NAMES = ("data", "compressed", "zero", "unallocated", "lost")
_STATUS_OF_TYPE = np.full(16, S_LOST, dtype=np.uint8)
_STATUS_OF_TYPE[[T.NORMAL]] = S_DATA
_STATUS_OF_TYPE[[T.COMPRESSED]] = S_COMPRESSED
_STATUS_OF_TYPE[[T.ZERO_PLAIN, T.ZERO_ALLOC]] = S_ZERO
_STATUS_OF_TYPE[[T.UNALLOCATED_PLAIN, T.UNALLOCATED_ALLOC]] = S_FALL


@dataclass
class GuestRuns:
    """Sorted, gap-free guest runs. `host`: byte offset of S_DATA runs, the L2 descriptor of
    S_COMPRESSED runs, -1 otherwise; `reason`: Reason of S_LOST runs; `depth`: chain layer."""

    start: np.ndarray
    end: np.ndarray
    status: np.ndarray
    host: np.ndarray
    reason: np.ndarray
    depth: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    @staticmethod
    def make(start, end, status, host, reason, depth=0) -> "GuestRuns":
        start = np.atleast_1d(np.asarray(start, dtype=np.int64))
        n = len(start)

        def col(v, dt):
            return np.broadcast_to(np.asarray(v, dtype=dt), (n,)).copy()

        return GuestRuns(start, col(end, np.int64), col(status, np.uint8), col(host, np.int64),
                         col(reason, np.int32), col(depth, np.int16))

    @staticmethod
    def concat(parts: list["GuestRuns"]) -> "GuestRuns":
        parts = [p for p in parts if len(p)]
        if not parts:
            return GuestRuns.make([], [], [], [], [])
        return GuestRuns(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def take(self, idx) -> "GuestRuns":
        return GuestRuns(*(getattr(self, f)[idx] for f in _FIELDS))

    def clip(self, a: int, b: int) -> "GuestRuns":
        """The runs over [a, b), cut at the ends (data hosts moved along)."""
        i = max(0, int(np.searchsorted(self.end, a, side="right")))
        j = int(np.searchsorted(self.start, b, side="left"))
        r = self.take(slice(i, j))
        if len(r):
            r.start = r.start.copy()
            r.end = r.end.copy()
            r.host = r.host.copy()
            cut = max(0, a - int(r.start[0]))
            if cut and r.status[0] == S_DATA:
                r.host[0] += cut
            r.start[0] = max(int(r.start[0]), a)
            r.end[-1] = min(int(r.end[-1]), b)
        return r

    def coalesce(self) -> "GuestRuns":
        if len(self) <= 1:
            return self
        s = self
        same = ((s.status[1:] == s.status[:-1]) & (s.reason[1:] == s.reason[:-1]) & (s.depth[1:] == s.depth[:-1])
                & (s.status[1:] != S_COMPRESSED)
                & ((s.status[1:] != S_DATA) | (s.host[1:] == s.host[:-1] + (s.end[:-1] - s.start[:-1]))))
        heads = np.flatnonzero(np.r_[True, ~same])
        out = s.take(heads)
        out.end = s.end[np.r_[heads[1:] - 1, len(s) - 1]]
        return out


_FIELDS = ("start", "end", "status", "host", "reason", "depth")


@dataclass
class Orphans:
    """Unreferenced clusters of a layer that hold something (after placement)."""

    clusters: np.ndarray  # host cluster indices
    guesses: np.ndarray  # Guess
    leaked: np.ndarray  # bool: refcount > 0 (False where refcounts are unknown)
    placed_tables: dict[int, int] = field(default_factory=dict)  # L1 slot -> orphan L2 table offset
    unplaced_tables: list[int] = field(default_factory=list)  # offsets of live orphan tables not placed
    evidence: int = 0  # unreferenced data clusters that some lost entry may have pointed at


@dataclass
class LayerMap:
    path: str
    virtual_size: int
    cluster_size: int
    runs: GuestRuns  # depth 0
    orphans: Orphans
    notes: list[str]
    refcounts_known: bool
    l1_offset: int | None  # the L1 table used (None: unknown)
    l1_found_by_content: bool


class _Layer:
    def __init__(self, f: ImageFile):
        self.f = f
        h = self.h = f.header
        self.cs, self.cb = h.cluster_size, h.cluster_bits
        self.nb = f.nb_clusters
        self.n = h.l2_entries
        self.ext = h.extended_l2
        self.size = f.reading.virtual_size
        if self.size > 1 << 56 or h.l1_entries_needed > C.QCOW_MAX_L1_SIZE // 8:
            raise QcowError(f"{f.path}: virtual size {h.size} (offset 24) is implausible: the guest disk is unknown")
        self.need = h.l1_entries_needed
        self.notes: list[str] = []
        self.meta = np.zeros(self.nb, dtype=bool)
        self.snap_tables: set[int] = set()  # L2 tables of snapshots (shared with the active L1 is fine)
        self.snap_l1: list[np.ndarray] = []
        self.snap_guest = None  # per host cluster: the guest cluster snapshots map there (-2: several)
        self.snap_ref = np.zeros(self.nb, dtype=bool)  # clusters snapshots' data or compressed streams use
        self.rc: np.ndarray | None = None

    # ---- small helpers ------------------------------------------------------------------------
    def table(self, off: int) -> tuple[np.ndarray, np.ndarray | None]:
        words = self.f.u64(off, self.n * (2 if self.ext else 1))
        if self.ext:
            return words[0::2].copy(), words[1::2].copy()
        return words, None

    def region(self, off: int, length: int) -> np.ndarray:
        """Host clusters of a byte region, limited to the file (empty if unaligned or outside)."""
        if length <= 0 or off % self.cs or off >= self.f.file_size:
            return np.zeros(0, dtype=np.int64)
        return np.arange(off // self.cs, min(self.nb, -(-(off + length) // self.cs)), dtype=np.int64)

    def note(self, text: str) -> None:
        self.notes.append(text)

    # ---- refcounts (evidence only) ---------------------------------------------------------
    def refcounts(self) -> None:
        h, cs = self.h, self.cs
        rt_off, rt_cl = h.refcount_table_offset, h.refcount_table_clusters
        if not self.f.reading.refcounts_readable or not rt_cl or rt_cl * cs > C.QCOW_MAX_REFTABLE_SIZE \
                or rt_off % cs or rt_off < cs or rt_off >= self.f.file_size:
            self.note("refcount table unusable (offset or size invalid): leaked clusters cannot be told from "
                      "stale ones")
            return
        self.meta[self.region(rt_off, rt_cl * cs)] = True
        rt = self.f.u64(rt_off, rt_cl * cs // 8)
        per = h.refcount_block_entries
        rc = np.zeros(self.nb, dtype=bool)
        blocks = 0
        for i in np.flatnonzero(rt).tolist():
            off = int(rt[i]) & C.REFT_OFFSET_MASK
            if int(rt[i]) & C.REFT_RESERVED_MASK or off % cs or off < cs or off >= self.f.file_size \
                    or i * per >= self.nb:
                continue
            self.meta[off // cs] = True  # named as a structure: never trusted as anyone's data either
            raw = np.frombuffer(self.f.pread(off, cs), dtype=np.uint8).reshape(1, cs)
            g = guess_rows(raw, extended=self.ext, cluster_bits=self.cb, file_size=self.f.file_size,
                           refcount_order=h.refcount_order)[0]
            if g not in (Guess.REFCOUNT_BLOCK, Guess.ZEROS):
                continue  # does not look like a refcount block: its counts are not used
            vals = unpack_refcounts(raw.tobytes(), h.refcount_order)
            hi = min(self.nb, (i + 1) * per)
            rc[i * per:hi] = vals[:hi - i * per] != 0
            blocks += 1
        if not blocks or not rc[0]:
            self.note("refcount structure broken (no usable block, or the header has refcount 0): leaked "
                      "clusters cannot be told from stale ones")
            return
        self.rc = rc

    # ---- snapshots (metadata and witnesses) ---------------------------------------------------
    def snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        try:
            snaps = read_snapshot_table(self.f.pread, self.f.file_size, h.snapshots_offset, h.nb_snapshots,
                                        tolerant=True)
        except QcowError:
            snaps = []
        if len(snaps) < h.nb_snapshots:
            self.note(f"snapshot table: {len(snaps)} of {h.nb_snapshots} entries readable")
        if not snaps:
            return
        end = snaps[-1].offset + snaps[-1].entry_size
        self.meta[self.region(h.snapshots_offset, end - h.snapshots_offset)] = True
        hosts, guests = [], []
        for sn in snaps:
            if not sn.l1_size or sn.l1_size > C.QCOW_MAX_L1_SIZE // 8 or sn.l1_table_offset % self.cs \
                    or sn.l1_table_offset + sn.l1_size * 8 > self.f.file_size:
                self.note(f"snapshot {sn.id}: L1 table unusable (offset or size invalid)")
                continue
            self.meta[self.region(sn.l1_table_offset, sn.l1_size * 8)] = True
            l1 = self.f.u64(sn.l1_table_offset, sn.l1_size)
            offs, bad = l1_verdict(l1, cluster_bits=self.cb)
            offs = np.where(bad != 0, 0, offs)
            offs[offs >= self.f.file_size] = 0
            self.snap_l1.append(offs)
            for slot, off in ((i, int(offs[i])) for i in np.flatnonzero(offs).tolist()):
                w0, bm = self.table(off)
                v = l2_verdict(w0, bm, cluster_bits=self.cb)
                if table_rejected(int(v.impossible.sum()) + int(v.dup_excess.sum()), int(v.used.sum())):
                    continue
                self.meta[off // self.cs] = True
                self.snap_tables.add(off)
                ok = (v.host >= 0) & (v.host < self.nb) & ~v.impossible
                hosts.append(v.host[ok])
                guests.append(slot * self.n + np.flatnonzero(ok))
                comp = v.comp & (v.coff < self.f.file_size)
                for co, nby in zip(v.coff[comp].tolist(), v.nbytes[comp].tolist()):
                    self.snap_ref[co // self.cs:min(self.nb, (co + nby - 1) // self.cs + 1)] = True
        if hosts:
            hs, gs = np.concatenate(hosts), np.concatenate(guests)
            sg = np.full(self.nb, -1, dtype=np.int64)
            sg[hs] = gs
            disagree = sg[hs] != gs
            sg[hs[disagree]] = -2
            self.snap_guest = sg
            self.snap_ref[hs] = True

    # ---- the active L1 ---------------------------------------------------------------------
    def active_l1(self) -> tuple[np.ndarray, np.ndarray, int | None, bool]:
        """(offsets, reasons) per slot [0, need), the L1 offset used, whether found by content."""
        h, cs = self.h, self.cs
        off, size = h.l1_table_offset, h.l1_size
        why = None
        if size * 8 > C.QCOW_MAX_L1_SIZE:
            why = f"l1_size {size} (offset 36) is above QEMU's limit"
        elif size and (off % cs or off < cs):
            why = f"L1 table offset 0x{off:x} (offset 40) is {'not cluster aligned' if off % cs else 'the header'}"
        elif size and off + size * 8 > self.f.file_size:
            why = f"L1 table at 0x{off:x} ({size} entries) runs past the end of the file (0x{self.f.file_size:x})"
        elif size and self.meta[off // cs]:
            why = f"L1 table offset 0x{off:x} points at other metadata"
        l1 = None
        if why is None and size:
            l1 = self.f.u64(off, size)
            _o, bad = l1_verdict(l1, cluster_bits=self.cb)
            if l1_rejected(int((bad != 0).sum()), int((l1 != 0).sum())):
                why = f"the L1 table at 0x{off:x} is not an L1 table ({int((bad != 0).sum())} impossible entries)"
        by_content = False
        if why is not None or (not size and self.need):
            self.note(f"active L1 table unusable: {why or 'l1_size is 0'}; searching the file for it by content")
            found = self.find_l1()
            if found is None:
                return np.zeros(self.need, np.int64), np.full(self.need, Reason.L1_UNKNOWN, np.uint8), None, False
            off, size, by_content = found, self.need, True
            l1 = self.f.u64(off, size)
            self.note(f"active L1 table found by content at 0x{off:x}")
        self.meta[self.region(off, size * 8)] = True
        offs, reason = l1_verdict(l1 if l1 is not None else np.zeros(0, np.uint64), cluster_bits=self.cb)
        out_off = np.zeros(self.need, np.int64)
        out_reason = np.full(self.need, Reason.L1_SHORT, np.uint8)
        k = min(self.need, len(offs))
        out_off[:k], out_reason[:k] = np.where(reason[:k] != 0, 0, offs[:k]), reason[:k]
        if k < self.need:
            self.note(f"l1_size {size} covers {k} of the {self.need} L1 entries the virtual size needs")
        return out_off, out_reason, off, by_content

    def find_l1(self) -> int | None:
        """The one cluster-aligned run of clusters holding `need` valid L1 entries that point at
        L2-looking clusters (never a snapshot's L1 table or other known metadata)."""
        cs, n = self.cs, self.need
        if not n:
            return None
        k = -(-n * 8 // cs)
        per = max(1, _SCAN_BYTES // cs)
        ok = np.zeros(self.nb, dtype=bool)
        first_nz = np.zeros(self.nb, dtype=bool)
        buf = np.empty((min(per, self.nb), cs // 8), dtype=np.uint64)
        mask, copied = _U64(C.L1E_OFFSET_MASK), _U64(C.QCOW_OFLAG_COPIED)
        for a in range(0, self.nb, per):
            rows = buf[:min(per, self.nb - a)]
            self.f.read_into(rows, a * cs)
            w = native(rows)
            off = w & mask
            good = (w == 0) | (((w & ~(mask | copied)) == 0) & (off >= _U64(cs)) & ((off & _U64(cs - 1)) == 0)
                               & (off < _U64(self.f.file_size)))
            ok[a:a + len(rows)] = good.all(axis=1)
            first_nz[a:a + len(rows)] = (w[:, :min(n, cs // 8)] != 0).any(axis=1)
        ok[0] = False
        ok &= ~self.meta
        starts = np.flatnonzero(first_nz & ok)
        cands = []
        for c in starts.tolist():
            if c + k > self.nb or not ok[c:c + k].all():
                continue
            l1 = self.f.u64(c * cs, n)
            offs, bad = l1_verdict(l1, cluster_bits=self.cb)
            if bad.any():
                continue
            tabs = np.unique(offs[offs != 0]) // cs
            raw = np.empty((len(tabs), cs), dtype=np.uint8)
            for j, t in enumerate(tabs.tolist()):
                self.f.read_into(raw[j], t * cs)
            g = guess_rows(raw, extended=self.ext, cluster_bits=self.cb, file_size=self.f.file_size,
                           refcount_order=self.h.refcount_order)
            if ((g == Guess.L2_TABLE) | (g == Guess.ZEROS)).all() and (g == Guess.L2_TABLE).any():
                cands.append((c, l1.tobytes()))
        if len(cands) > 1 and self.rc is not None:
            live = [x for x in cands if self.rc[x[0]]]
            cands = live or cands
        if len({body for _c, body in cands}) == 1:
            return cands[0][0] * cs
        if cands:
            self.note("L1 table search: " + ", ".join(f"0x{c * cs:x}" for c, _b in cands)
                      + " look like different L1 tables; none is trusted")
        else:
            self.note("L1 table search: no cluster of the file holds a table of valid L1 entries")
        return None

    # ---- the active L2 tables ---------------------------------------------------------------
    def tables(self, offs: np.ndarray, reasons: np.ndarray) -> dict[int, int]:
        """Validate the tables the L1 slots point at: slot -> offset of accepted tables; lost
        slots get their reason in `reasons` (in place)."""
        cs = self.cs
        slots = np.flatnonzero(offs)
        past = offs[slots] >= self.f.file_size
        reasons[slots[past]] = Reason.TABLE_PAST_EOF
        slots = slots[~past]
        cl = offs[slots] // cs
        dup = np.bincount(cl, minlength=self.nb)[cl] > 1 if len(cl) else np.zeros(0, bool)
        other = self.meta[cl] & ~np.isin(offs[slots], np.fromiter(self.snap_tables, np.int64))
        reasons[slots[dup | other]] = Reason.TABLE_CONFLICT
        accepted: dict[int, int] = {}
        for slot in slots[~(dup | other)].tolist():
            off = int(offs[slot])
            w0, bm = self.table(off)
            v = l2_verdict(w0, bm, cluster_bits=self.cb)
            bad = int(v.impossible.sum()) + int(v.dup_excess.sum())
            self.meta[off // cs] = True  # whatever it is, some structure put it there
            if table_rejected(bad, int(v.used.sum())):
                i = int(np.flatnonzero(v.impossible)[0]) if v.impossible.any() else -1
                example = f"entry {i}: {REASON_TEXT[Reason(int(v.reason[i]))]}" if i >= 0 else \
                    "host clusters mapped several times"
                self.note(f"L2 table of L1 index {slot} at 0x{off:x} rejected: {int(v.impossible.sum())} impossible "
                          f"entries and {int(v.dup_excess.sum())} repeated host clusters among {int(v.used.sum())} "
                          f"used entries ({example})")
                reasons[slot] = Reason.TABLE_REJECTED
                continue
            accepted[slot] = off
        return accepted

    def entry_verdicts(self, accepted: dict[int, int]) -> dict[int, tuple]:
        """Per accepted table: (w0, bm, reason per entry), with the whole-image rules applied:
        data past EOF, into metadata, shared with another guest cluster or a compressed stream."""
        cs, nb = self.cs, self.nb
        out: dict[int, tuple] = {}
        hosts, owners, chost, cowner = [], [], [], []
        for slot, off in accepted.items():
            w0, bm = self.table(off)
            v = l2_verdict(w0, bm, cluster_bits=self.cb)
            reason = v.reason.copy()
            g = slot * self.n + np.arange(self.n, dtype=np.int64)
            inside = (v.host >= 0) & (v.host < nb)
            hosts.append(v.host[inside])
            owners.append(g[inside])
            if v.comp.any():
                cpast = v.comp & (v.coff >= self.f.file_size)
                reason[cpast & (reason == 0)] = Reason.COMPRESSED_PAST_EOF
                ok = v.comp & ~cpast
                first, last = v.coff[ok] // cs, np.minimum((v.coff[ok] + v.nbytes[ok] - 1) // cs, nb - 1)
                cnt = last - first + 1
                chost.append(np.repeat(first, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)))
                cowner.append(np.repeat(g[ok], cnt))
            out[slot] = (w0, bm, reason, v, g)
        allh = np.concatenate(hosts) if hosts else np.zeros(0, np.int64)
        data_count = np.bincount(allh, minlength=nb) if len(allh) else np.zeros(nb, np.int64)
        ch = np.concatenate(chost) if chost else np.zeros(0, np.int64)
        comp_count = np.bincount(ch, minlength=nb) if len(ch) else np.zeros(nb, np.int64)
        bad_comp_owner = set()
        if len(ch):
            hit = (data_count[ch] > 0) | self.meta[ch]
            bad_comp_owner = set(np.concatenate(cowner)[hit].tolist())
        self.claimed = (data_count > 0) | (comp_count > 0)
        for slot, (w0, bm, reason, v, g) in out.items():
            inside = (v.host >= 0) & (v.host < nb)
            h = np.where(inside, v.host, 0)
            conflict = inside & ((data_count[h] > 1) | (comp_count[h] > 0))
            if self.snap_guest is not None:
                sg = self.snap_guest[h]
                conflict |= inside & ((sg == -2) | ((sg >= 0) & (sg != g)))
            reason[conflict & (reason == 0)] = Reason.CONFLICT
            reason[inside & self.meta[h] & (reason == 0)] = Reason.INTO_METADATA
            # sharing data clusters with another table more than once: a copy of that table was
            # written over one of them, and which one is unknown; its zeros would lie as well
            mine = np.bincount(h[inside], minlength=nb)[h] if inside.any() else np.zeros_like(h)
            if int((conflict & (mine < data_count[h])).sum()) >= 2:
                reason[:] = Reason.TABLE_CONFLICT
                self.note(f"L2 table of L1 index {slot} shares data clusters with another table: both are untrusted")
            if bad_comp_owner:
                cbad = v.comp & np.isin(g, np.fromiter(bad_comp_owner, np.int64))
                reason[cbad & (reason == 0)] = Reason.INTO_METADATA
        return {slot: (w0, bm, reason) for slot, (w0, bm, reason, _v, _g) in out.items()}

    # ---- orphans -----------------------------------------------------------------------------
    def orphans(self, offs: np.ndarray, reasons: np.ndarray, accepted: dict[int, int]) -> Orphans:
        cs, nb = self.cs, self.nb
        unref = ~self.meta & ~self.claimed & ~self.snap_ref
        unref[0] = False
        cand = with_data(self.f.fd, np.flatnonzero(unref), cs)
        guesses = guess_clusters(self.f, cand)
        keep = guesses != Guess.ZEROS
        cand, guesses = cand[keep], guesses[keep]
        leaked = self.rc[cand] if self.rc is not None else np.zeros(len(cand), bool)
        orph = Orphans(cand, guesses, leaked)
        # orphan L2 tables that could be placed: valid, with data no active table references (a
        # snapshot may share it: then it witnesses the slot)
        tables = []
        for c in cand[guesses == Guess.L2_TABLE].tolist():
            w0, bm = self.table(c * cs)
            v = l2_verdict(w0, bm, cluster_bits=self.cb)
            if v.impossible.any() or v.dup_excess.any() or not v.used.any():
                continue
            inside = (v.host >= 0) & (v.host < nb)
            hosts = v.host[inside]
            if not inside.any() or self.meta[hosts].any():
                continue
            if self.claimed[hosts].any():
                self.note(f"unreferenced L2 table at 0x{c * cs:x} maps data live tables map: a stale copy, ignored")
                continue
            live = self.rc is not None and bool(self.rc[c])
            tables.append((c * cs, hosts, live))
        empty = [i for i in range(self.need) if offs[i] == 0 and reasons[i] in (Reason.NONE, Reason.L1_ENTRY_BAD)]
        used_hosts = np.concatenate([t[1] for t in tables]) if tables else np.zeros(0, np.int64)
        shared = np.bincount(used_hosts, minlength=nb) > 1 if len(used_hosts) else np.zeros(nb, bool)
        placed: dict[int, int] = {}
        for off, hosts, live in tables:
            if shared[hosts].any():
                continue  # two orphans claim one data cluster: neither is trusted
            slots = self.witnessed(off, hosts)
            slots = [s for s in slots if s in empty and s not in placed]
            if len(slots) == 1:
                placed[slots[0]] = off
                self.note(f"orphaned L2 table at 0x{off:x} placed at L1 index {slots[0]} (a snapshot witnesses it)")
        rest = [t for t in tables if t[0] not in placed.values() and not shared[t[1]].any()]
        free_slots = [s for s in empty if s not in placed]
        if len(rest) == 1 and rest[0][2] and len(free_slots) == 1:
            placed[free_slots[0]] = rest[0][0]
            self.note(f"orphaned L2 table at 0x{rest[0][0]:x} placed at L1 index {free_slots[0]}: the only live "
                      "(leaked) orphan table and the only empty L1 slot")
            rest = []
        orph.placed_tables = placed
        witnessed = {t[0] for t in rest if self.witnessed(t[0], t[1])}
        orph.unplaced_tables = [t[0] for t in rest if t[2] or self.rc is None or t[0] in witnessed]
        if orph.unplaced_tables:
            self.note("orphaned L2 table(s) at " + ", ".join(f"0x{o:x}" for o in orph.unplaced_tables)
                      + " could not be placed: the empty L1 slots they may belong to are lost")
            for s in free_slots:
                reasons[s] = Reason.ORPHAN_SLOT
        for slot, off in placed.items():
            offs[slot] = off
            reasons[slot] = Reason.NONE
            accepted[slot] = off
            self.meta[off // cs] = True
        return orph

    def witnessed(self, off: int, hosts: np.ndarray) -> list[int]:
        """L1 slots where a snapshot has this table, or a table sharing its data clusters."""
        slots = set()
        for l1 in self.snap_l1:
            slots.update(np.flatnonzero(l1 == off).tolist())
        if self.snap_guest is not None and len(hosts):
            g = self.snap_guest[hosts]
            slots.update((g[g >= 0] // self.n).tolist())
        return sorted(slots)

    # ---- guest runs --------------------------------------------------------------------------
    def runs(self, offs, reasons, verdicts: dict[int, tuple]) -> GuestRuns:
        cs, n = self.cs, self.n
        span = n * cs
        parts: list[GuestRuns] = []
        for slot in range(self.need):
            a, b = slot * span, min(self.size, (slot + 1) * span)
            if slot in verdicts:
                w0, bm, reason = verdicts[slot]
                parts.append(self.table_runs(slot, w0, bm, reason).clip(a, b))
            elif reasons[slot] != Reason.NONE:
                parts.append(GuestRuns.make(a, b, S_LOST, -1, reasons[slot]))
            else:
                parts.append(GuestRuns.make(a, b, S_FALL, -1, 0))
        return GuestRuns.concat(parts).coalesce()

    def table_runs(self, slot: int, w0: np.ndarray, bm: np.ndarray | None, reason: np.ndarray) -> GuestRuns:
        cs = self.cs
        bad = reason != 0
        cw0 = np.where(bad, _U64(0), w0)
        cbm = None if bm is None else np.where(bad, _U64(0), bm)
        u = cluster_units(cw0, cbm, slot * self.n, cs, extended=self.ext)
        status = _STATUS_OF_TYPE[u.kind]
        idx = (u.start // cs) - slot * self.n
        why = reason[idx].astype(np.int32)
        status = np.where(why != 0, S_LOST, status).astype(np.uint8)
        why = np.where((status == S_LOST) & (why == 0), Reason.ENTRY_BITMAP, why)
        host = np.where((status == S_DATA) | (status == S_COMPRESSED), u.host, -1)
        r = GuestRuns.make(u.start, u.end, status, host, why)
        # data whose host bytes run past the end of the file: that part is lost
        fsz = self.f.file_size
        part = (r.status == S_DATA) & (r.host + (r.end - r.start) > fsz)
        if part.any():
            whole = part & (r.host >= fsz)
            r.status[whole] = S_LOST
            r.reason[whole] = Reason.DATA_PAST_EOF
            r.host[whole] = -1
            split = np.flatnonzero(part & ~whole)
            if len(split):
                cut = r.start[split] + (fsz - r.host[split])
                tail = GuestRuns.make(cut, r.end[split], S_LOST, -1, Reason.DATA_PAST_EOF)
                r.end[split] = cut
                r = GuestRuns.concat([r, tail])
                r = r.take(np.argsort(r.start, kind="stable"))
        return r


def analyse_layer(f: ImageFile) -> LayerMap:
    """Everything salvage knows about one qcow2 file's guest disk."""
    ly = _Layer(f)
    ly.meta[0] = True
    ly.refcounts()
    ly.snapshots()
    offs, reasons, l1_off, by_content = ly.active_l1()
    accepted = ly.tables(offs, reasons) if l1_off is not None else {}
    verdicts = ly.entry_verdicts(accepted)
    orph = ly.orphans(offs, reasons, accepted)
    if orph.placed_tables:
        verdicts = ly.entry_verdicts(accepted)
    # unreferenced guest data is evidence that some table lost entries
    data = orph.guesses == Guess.DATA
    if orph.placed_tables:
        still = ~ly.claimed[orph.clusters] & ~ly.meta[orph.clusters]
        orph.clusters, orph.guesses, orph.leaked = orph.clusters[still], orph.guesses[still], orph.leaked[still]
        data = orph.guesses == Guess.DATA
    orph.evidence = int((data & orph.leaked).sum()) if ly.rc is not None else int(data.sum())
    if orph.evidence:
        ly.note(f"{orph.evidence} unreferenced cluster(s) hold guest data "
                f"({'leaked: refcount > 0' if ly.rc is not None else 'refcounts unknown'}): some table lost its "
                "entries; save them with --orphans DIR")
        for slot, (w0, bm, reason) in verdicts.items():
            used = (w0 != 0) if bm is None else ((w0 != 0) | (bm != 0))
            if not used.any():
                offs_slot = accepted[slot]
                reasons[slot] = Reason.TABLE_ZEROS
                ly.note(f"L2 table of L1 index {slot} at 0x{offs_slot:x} is all zeros: its range is lost")
        verdicts = {s: v for s, v in verdicts.items() if reasons[s] != Reason.TABLE_ZEROS}
    runs = ly.runs(offs, reasons, verdicts)
    return LayerMap(f.path, ly.size, ly.cs, runs, orph, ly.notes, ly.rc is not None, l1_off, by_content)
