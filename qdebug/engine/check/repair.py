"""Repair: what `qemu-img check -r leaks|all` repairs, and the invalid subclusters QEMU cannot.

A repair is planned first (pure: nothing is written) as byte patches with, for every finding, the
action and the guest bytes that will read differently; `apply_repair` then writes the patches
through `Image.pwrite` inside one undo-journal step, under QEMU-compatible locks.

Order matters and mirrors QEMU: L2 entries are fixed first (so references change: a compressed
cluster whose bitmap is cleared is referenced again and never freed as a "leak"; a zeroed
preallocated entry drops its cluster), then refcounts are set to the references, then COPIED flags
follow the new refcounts, then the corrupt and dirty bits are cleared if nothing is left broken.
Refcount blocks that are missing or broken (the cases where QEMU rebuilds the whole structure) are
replaced by new blocks at the end of the file, as long as the refcount table has a slot for them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..errors import QcowError
from ..format import constants as C
from ..format.header import FIELD
from ..format.refcounts import pack_refcounts

_INCOMPAT = FIELD["incompatible_features"]
from .checker import CheckReport, Finding, FindingKind, Severity, _Ctx, check_image


class RepairPolicy(str, Enum):
    """What a repair makes of subclusters marked both allocated and zero (QEMU 7.2 only reports them)."""

    KEEP_DATA = "keep-data"
    ZERO = "zero"
    UNALLOCATE = "unallocate"

    @property
    def effect(self) -> str:
        """The policy's effect on the guest, in words (help texts and the TUI's repair dialog)."""
        return {RepairPolicy.KEEP_DATA: "subclusters marked both allocated and zero keep their data (the zero bit "
                                        "is cleared)",
                RepairPolicy.ZERO: "subclusters marked both allocated and zero read as zeros (the allocation bit "
                                   "is cleared)",
                RepairPolicy.UNALLOCATE: "broken subclusters become unallocated: they read from the backing file, "
                                         "or zeros without one"}[self]


POLICIES = tuple(p.value for p in RepairPolicy)


def repair_policy(name: str) -> RepairPolicy:
    try:
        return RepairPolicy(name)
    except ValueError:
        raise QcowError(f"unknown repair policy {name!r} (use {', '.join(POLICIES)})") from None
_U64 = np.uint64
_LOW = 0xFFFFFFFF


@dataclass(frozen=True)
class Patch:
    offset: int
    data: bytes
    what: str  # 'L1' | 'L2' | 'refblock' | 'reftable' | 'header'

    def to_json(self) -> dict:
        return {"offset": self.offset, "length": len(self.data), "what": self.what, "data": self.data.hex()}


@dataclass(frozen=True)
class GuestChange:
    """A guest byte range whose content changes: a preview of what it reads before and after."""

    start: int
    length: int
    before: str  # hex preview, or what QEMU returns ("EIO ..."), per interpretation
    after: str

    def to_json(self) -> dict:
        return {"start": self.start, "length": self.length, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class RepairItem:
    finding: Finding | None
    action: str
    patches: tuple[Patch, ...] = ()
    changes: tuple[GuestChange, ...] = ()

    def to_json(self) -> dict:
        return {"finding": self.finding.to_json() if self.finding else None, "action": self.action,
                "patches": [p.to_json() for p in self.patches], "guest-changes": [c.to_json() for c in self.changes]}


@dataclass(frozen=True)
class RepairPlan:
    image: str
    policy: str
    items: tuple[RepairItem, ...]
    unsupported: tuple[str, ...] = ()  # findings this plan leaves as they are, and why
    clear_corrupt: bool = False
    clear_dirty: bool = False
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    new_size: int | None = None  # the file grows to this (new refcount blocks at the end)

    @property
    def patches(self) -> list[Patch]:
        return [p for it in self.items for p in it.patches]

    def to_json(self) -> dict:
        return {"image": self.image, "policy": self.policy, "items": [i.to_json() for i in self.items],
                "unsupported": list(self.unsupported), "clear-corrupt-bit": self.clear_corrupt,
                "clear-dirty-bit": self.clear_dirty, "leaks-fixed": self.leaks_fixed,
                "corruptions-fixed": self.corruptions_fixed, "new-size": self.new_size}

    def to_text(self) -> str:
        lines = []
        for it in self.items:
            if it.finding is not None:
                place = it.finding.place()
                lines.append(f"* {it.finding.message}" + (f"  [{place}]" if place else ""))
                lines.append(f"  repair: {it.action}")
            else:
                lines.append(f"* {it.action}")
            for p in it.patches[:8]:
                lines.append(f"    write {len(p.data)} bytes at 0x{p.offset:x} ({p.what})")
            if len(it.patches) > 8:
                lines.append(f"    ... and {len(it.patches) - 8} more writes")
            for c in it.changes:
                lines.append(f"    guest 0x{c.start:x}+0x{c.length:x}: before {c.before}")
                lines.append(f"    {' ' * len(f'guest 0x{c.start:x}+0x{c.length:x}:')} after  {c.after}")
        for u in self.unsupported:
            lines.append(f"! not repaired: {u}")
        if not lines:
            lines.append("nothing to repair")
        return "\n".join(lines)


# ---- planning --------------------------------------------------------------------------------------
class _Planner:
    def __init__(self, chain, report: CheckReport, policy: str):
        policy = repair_policy(policy)
        self.chain = chain
        self.img = chain.top
        self.h = self.img.header
        self.cs = self.h.cluster_size
        self.cb = self.h.cluster_bits
        self.report = report
        self.policy = policy
        self.items: list[RepairItem] = []
        self.unsupported: list[str] = []
        self.entries: dict[int, tuple[int, int]] = {}  # L2 entry file offset -> (word0, bitmap)
        self.ref_delta: dict[int, int] = {}  # host cluster -> reference change from entry fixes
        self.unfixed = 0
        self.entry_fixes = 0  # QEMU-style entry repairs (counted as corruptions fixed)
        self.slots_fixed = 0  # broken refcount table entries replaced or dropped

    # -- L2 entries
    def entry(self, f: Finding) -> tuple[int, int, int]:
        """(file offset, word0, bitmap) of the finding's L2 entry, as already planned."""
        off = f.l2_offset + f.l2_index * self.h.l2_entry_size
        w0, bm = self.entries.get(off, (f.entry, f.bitmap or 0))
        return off, w0, bm

    def set_entry(self, off: int, w0: int, bm: int) -> list[Patch]:
        self.entries[off] = (w0, bm)
        if self.h.extended_l2:
            return [Patch(off, struct.pack(">QQ", w0, bm), "L2")]
        return [Patch(off, struct.pack(">Q", w0), "L2")]

    def ref(self, cluster: int, delta: int) -> None:
        self.ref_delta[cluster] = self.ref_delta.get(cluster, 0) + delta

    # -- guest previews
    def _backing_read(self, off: int, n: int) -> bytes:
        from ..file.chain import Chain
        from ..read.guest import read_guest

        if len(self.chain.layers) < 2:
            return bytes(n)
        data = read_guest(Chain(self.chain.layers[1:]), off, n)
        return data + bytes(n - len(data))

    def _sc_bytes(self, host: int, bm: int, sc: int, guest: int, n: int) -> bytes | str:
        """What subcluster `sc` reads under bitmap `bm` (valid), first `n` bytes."""
        if bm >> sc & 1:
            return self.img.pread(host + sc * self.h.subcluster_size, n)
        if bm >> (32 + sc) & 1:
            return bytes(n)
        return self._backing_read(guest, n)

    def preview(self, f: Finding, host: int, old_bm: int, new_bm: int, scs) -> list[GuestChange]:
        if f.snapshot is not None or not self.h.extended_l2:
            return []
        scsz = self.h.subcluster_size
        n = min(16, scsz)
        out = []
        for sc in scs:
            guest = f.guest_offset + sc * scsz
            after = self._sc_bytes(host, new_bm, sc, guest, n)
            interp = []
            if host and old_bm >> sc & 1:
                interp.append("as data " + self.img.pread(host + sc * scsz, n).hex(" "))
            if old_bm >> (32 + sc) & 1:
                interp.append("as zero " + bytes(n).hex(" "))
            if not old_bm >> sc & 1 and not old_bm >> (32 + sc) & 1:
                interp.append("as unallocated " + self._backing_read(guest, n).hex(" "))
            out.append(GuestChange(guest, scsz, "EIO (QEMU: invalid cluster entry); " + "; ".join(interp),
                                   after.hex(" ") + (" ..." if scsz > n else "")))
        return out

    # -- the invalid-subcluster shapes (QEMU never repairs them)
    def fix_subclusters(self, f: Finding) -> None:
        off, w0, bm = self.entry(f)
        host = w0 & C.L2E_OFFSET_MASK
        new, scs = repaired_bitmap(w0, bm, self.policy)
        if f.kind is FindingKind.INVALID_BITMAP_ALLOCATED:
            if self.policy is RepairPolicy.KEEP_DATA:
                action = "keep the data: clear the zero bit of subclusters " + _list(scs)
            elif self.policy is RepairPolicy.ZERO:
                action = "read as zero: clear the allocation bit of subclusters " + _list(scs)
            else:
                what = "the backing file" if len(self.chain.layers) > 1 else "zeros (no backing file)"
                action = f"unallocate subclusters {_list(scs)}: they read from {what}"
            patches = self.set_entry(off, w0, new)
            self.items.append(RepairItem(f, action, tuple(patches), tuple(self.preview(f, host, bm, new, scs))))
        elif f.kind is FindingKind.INVALID_BITMAP_UNALLOCATED:
            action = ("the cluster has no host offset: clear the allocation bits of subclusters " + _list(scs)
                      + " (zero bits kept)")
            patches = self.set_entry(off, w0, new)
            self.items.append(RepairItem(f, action, tuple(patches), tuple(self.preview(f, 0, bm, new, scs))))
        elif f.kind is FindingKind.COMPRESSED_BITMAP:
            patches = self.set_entry(off, w0, 0)
            self._compressed_refs(w0, +1)
            self.items.append(RepairItem(f, "clear the bitmap of the compressed cluster; its data is kept (and its "
                                         "refcount stays: it is not a leak)", tuple(patches)))

    def _compressed_refs(self, w0: int, sign: int) -> None:
        x = 62 - (self.cb - 8)
        coff = w0 & ((1 << x) - 1)
        nsec = ((w0 >> x) & ((1 << (self.cb - 8)) - 1)) + 1
        self._region_refs(coff, nsec * 512 - (coff & 511), sign)

    def _region_refs(self, offset: int, size: int, sign: int) -> None:
        """References of a region as QEMU counts them: every cluster it touches, none if far past EOF."""
        if offset + size - self.img.file_size >= self.cs:
            return
        for c in range(offset >> self.cb, ((offset + size - 1) >> self.cb) + 1):
            self.ref(c, sign)

    # -- other entry-level repairs
    def fix_entry_bits(self, f: Finding) -> None:
        if f.kind is FindingKind.L2_RESERVED_BITS:
            off, w0, bm = self.entry(f)
            new = w0 & ~C.L2E_STD_RESERVED_MASK
            self.items.append(RepairItem(f, "clear the reserved bits of the L2 entry (I/O ignores them: no guest "
                                         "byte changes)", tuple(self.set_entry(off, new, bm))))
        elif f.kind is FindingKind.COMPRESSED_COPIED:
            off, w0, bm = self.entry(f)
            self.items.append(RepairItem(f, "clear the COPIED flag of the compressed cluster",
                                         tuple(self.set_entry(off, w0 & ~C.QCOW_OFLAG_COPIED, bm))))
        elif f.kind is FindingKind.L1_RESERVED_BITS and f.snapshot is None:
            off = self.h.l1_table_offset + 8 * f.l1_index
            new = f.entry & ~C.L1E_RESERVED_MASK
            self.items.append(RepairItem(f, "clear the reserved bits of the L1 entry",
                                         (Patch(off, struct.pack(">Q", new), "L1"),)))
            self.l1_fixed[f.l1_index] = new
        else:
            self.unfixed += 1
            self.unsupported.append(f"{f.message} [{f.place()}]")

    def fix_unaligned(self, f: Finding) -> None:
        """QEMU's fix_l2_entry_by_zero for preallocated entries; data clusters only by policy."""
        off, w0, bm = self.entry(f)
        if f.kind is FindingKind.DATA_CLUSTER_UNALIGNED and self.policy is RepairPolicy.KEEP_DATA:
            self.unfixed += 1
            self.unsupported.append(f"{f.message} [{f.place()}]: the data's real location is unknown; "
                                    "use --policy zero or unallocate to drop the mapping")
            return
        if self.h.extended_l2:
            alloc = bm & _LOW
            new = (bm | (alloc << 32)) & 0xFFFFFFFF00000000 if self.policy is not RepairPolicy.UNALLOCATE else bm & ~_LOW
            patches = self.set_entry(off, 0, new)
        else:
            patches = self.set_entry(off, C.QCOW_OFLAG_ZERO if self.policy is not RepairPolicy.UNALLOCATE else 0, 0)
        self._region_refs(f.host_offset, self.cs, -1)
        self.entry_fixes += 1
        after = "zeros" if self.policy is not RepairPolicy.UNALLOCATE else "the backing file (or zeros)"
        change = GuestChange(f.guest_offset, self.cs, "EIO for allocated subclusters (QEMU: unaligned cluster "
                             "offset); the others as their bits say", after) if f.snapshot is None else None
        self.items.append(RepairItem(f, "drop the unaligned host offset: the cluster's allocated subclusters "
                                     + ("read as zero" if self.policy is not RepairPolicy.UNALLOCATE else "fall through"),
                                     tuple(patches), (change,) if change else ()))


def repaired_bitmap(word0: int, bitmap: int, policy: str) -> tuple[int, list[int]]:
    """The valid bitmap an invalid extended L2 entry gets, and the subclusters whose bits change.

    Allocated cluster, subcluster both allocated and zero: keep-data clears the zero bit, zero the
    allocation bit, unallocate both. No host offset: the allocation bits go (zero bits stay).
    Compressed: the whole bitmap goes. Valid entries come back unchanged.
    """
    if word0 & C.QCOW_OFLAG_COMPRESSED:
        return 0, [i for i in range(32) if (bitmap | bitmap >> 32) >> i & 1]
    if not word0 & C.L2E_OFFSET_MASK:
        alloc = bitmap & _LOW
        return bitmap & ~alloc, [i for i in range(32) if alloc >> i & 1]
    both = bitmap & (bitmap >> 32) & _LOW
    policy = repair_policy(policy)
    if policy is RepairPolicy.KEEP_DATA:
        new = bitmap & ~(both << 32)
    elif policy is RepairPolicy.ZERO:
        new = bitmap & ~both
    else:
        new = bitmap & ~both & ~(both << 32)
    return new, [i for i in range(32) if both >> i & 1]


def _list(scs) -> str:
    return ",".join(map(str, scs))


def plan_repair(chain, report: CheckReport, *, policy: str = "keep-data", entries=None,
                mode: str = "qdebug") -> RepairPlan:
    """Plan a repair of `chain.top` from its check report. Nothing is written.

    `mode` 'qdebug' repairs everything it can (subclusters by `policy`); 'leaks' and 'all' do what
    `qemu-img check -r leaks|all` does, except that data QEMU would free is kept. `entries` (L2
    indices, or (L1, L2) pairs) limits the repair to the findings of those entries.
    """
    p = _Planner(chain, report, policy)
    p.l1_fixed = {}
    l1 = p.img.l1
    flags_only = np.flatnonzero((l1 != 0) & ((l1 & _U64(C.L1E_OFFSET_MASK)) == 0))
    if flags_only.size:
        raise QcowError(f"L1 entry {int(flags_only[0])} has flags but no L2 table offset (0x{int(l1[flags_only[0]]):x}): "
                        "QEMU counts the header as an L2 table there; qdebug cannot plan a safe repair")
    sub = (FindingKind.INVALID_BITMAP_ALLOCATED, FindingKind.INVALID_BITMAP_UNALLOCATED, FindingKind.COMPRESSED_BITMAP)
    want = None if entries is None else {e if isinstance(e, tuple) else (None, int(e)) for e in entries}

    def selected(f: Finding) -> bool:
        return want is None or (f.l1_index, f.l2_index) in want or (None, f.l2_index) in want

    findings = [f for f in report.findings if f.severity is not Severity.INFO]
    seen_entries: set[tuple] = set()
    for f in findings:
        key = (f.kind, f.l2_offset, f.l2_index)
        if f.l2_offset is not None and key in seen_entries:
            continue  # an L2 table shared with a snapshot: one entry, one repair
        seen_entries.add(key)
        if f.l2_offset is not None and (f.l2_offset == 0 or f.l2_offset % p.cs):
            p.unfixed += 1
            p.unsupported.append(f"{f.message} [{f.place()}]: its L2 table is itself misplaced; not touched")
        elif f.kind in sub:
            if mode == "qdebug" and selected(f):
                p.fix_subclusters(f)
            else:
                p.unfixed += 1
                if f.kind is FindingKind.COMPRESSED_BITMAP:
                    p._compressed_refs(f.entry, +1)  # never free its data as a "leak"
                    p.unsupported.append(f"{f.message} [{f.place()}]: kept as it is; its data is not freed")
        elif want is not None:
            continue
        elif f.kind is FindingKind.PREALLOC_CLUSTER_UNALIGNED and mode in ("all", "qdebug"):
            p.fix_unaligned(f)
        elif f.kind is FindingKind.DATA_CLUSTER_UNALIGNED and mode == "qdebug":
            p.fix_unaligned(f)
        elif f.kind in (FindingKind.L2_RESERVED_BITS, FindingKind.COMPRESSED_COPIED, FindingKind.L1_RESERVED_BITS) and mode == "qdebug":
            p.fix_entry_bits(f)
        elif f.kind in (FindingKind.LEAK, FindingKind.REFCOUNT_TOO_LOW, FindingKind.REFCOUNT_ZERO, FindingKind.COPIED_L1, FindingKind.COPIED_DATA, FindingKind.REFBLOCK_REFCOUNT, FindingKind.REFBLOCK_UNALIGNED, FindingKind.REFTABLE_RESERVED_BITS, FindingKind.REFBLOCK_OUTSIDE_IMAGE, FindingKind.REFCOUNT_UNREADABLE):
            continue  # handled below from the reference counts
        else:
            p.unfixed += 1
            p.unsupported.append(f"{f.message}" + (f" [{f.place()}]" if f.place() else ""))
    leaks_fixed = corruptions_fixed = 0
    new_size = None
    if want is None and mode in ("leaks", "all", "qdebug"):
        leaks_fixed, corruptions_fixed, new_size = _plan_refcounts(p, mode)
        n_copied = sum(1 for f in report.findings if f.kind in (FindingKind.COPIED_L1, FindingKind.COPIED_DATA))
        if mode != "leaks" or (not report.check_errors and report.corruptions == n_copied):
            corruptions_fixed += _plan_copied(p, mode)
    if mode == "all":
        corruptions_fixed += p.entry_fixes
    # (findings past the per-kind cap are not in this plan: a next round repairs them)
    fixed_all = p.unfixed == 0 and not report.unlisted and (want is None or _only_selected_broken(report, selected))
    h = p.h
    clear_corrupt = h.is_corrupt and fixed_all
    clear_dirty = h.is_dirty and fixed_all
    if clear_corrupt or clear_dirty:
        feats = h.incompatible_features & ~(C.QCOW2_INCOMPAT_CORRUPT if clear_corrupt else 0) & ~(
            C.QCOW2_INCOMPAT_DIRTY if clear_dirty else 0)
        p.items.append(RepairItem(None, "clear the " + " and ".join(
            n for n, on in (("corrupt bit", clear_corrupt), ("dirty bit", clear_dirty)) if on)
            + " (nothing broken is left)",
            (Patch(_INCOMPAT.offset, _INCOMPAT.pack(feats), "header"),)))
    return RepairPlan(p.img.path, policy, tuple(p.items), tuple(p.unsupported), clear_corrupt, clear_dirty,
                      leaks_fixed, corruptions_fixed, new_size)


def _only_selected_broken(report: CheckReport, selected) -> bool:
    return all(f.severity is Severity.INFO or (f.l2_index is not None and selected(f)) for f in report.findings)


def _plan_refcounts(p: _Planner, mode: str) -> tuple[int, int, int | None]:
    """Refcounts := references (after the planned entry fixes); broken or missing refcount blocks
    are replaced by new blocks at the end of the file. Returns (leaks fixed, corruptions fixed, new size)."""
    img, h, cs = p.img, p.h, p.cs
    refs = p.report.references.astype(np.int64)  # check keeps them as narrow as they fit
    ctx = _Ctx(img, None)
    per = h.refcount_block_entries
    rt = img.reftable.astype(np.uint64)
    nb_file = -(-img.file_size // cs)
    for c, d in p.ref_delta.items():
        if c >= len(refs):
            refs = np.concatenate([refs, np.zeros(c + 1 - len(refs), np.int64)])
        refs[c] += d
    if len(refs) < nb_file:
        refs = np.concatenate([refs, np.zeros(nb_file - len(refs), np.int64)])
    # which refcount table slots hold a usable block
    offs = (rt & _U64(C.REFT_OFFSET_MASK)).astype(np.int64)
    bad = ((rt & _U64(C.REFT_RESERVED_MASK)) != 0) | (offs % cs != 0) | (offs < 0) | ((offs >> p.cb) >= len(refs))
    good_off = np.where(bad, 0, offs)
    blk_cl = good_off >> p.cb
    # a block shared by two slots, or also used as something else, must be replaced
    users = np.bincount(blk_cl[good_off != 0], minlength=len(refs)) if (good_off != 0).any() else None
    for i in np.flatnonzero(good_off).tolist():
        c = int(blk_cl[i])
        if refs[c] != 1 or users[c] != 1:
            bad[i] = True
    need = set()
    nblocks = -(-len(refs) // per)
    if mode == "leaks":
        if p.report.rebuild_needed:
            raise QcowError("ERROR need to rebuild refcount structures (use -r all or qdebug repair)")
        bad[:] = True  # -r leaks never touches the refcount table: only usable blocks get fixed
        bad[good_off != 0] = False
    for b in np.flatnonzero(bad & (offs != 0)).tolist() if mode != "leaks" else ():
        if b >= nblocks:  # describes nothing in the file: drop the slot
            p.items.append(RepairItem(None, f"refcount table entry {b} points to a broken block that describes "
                                      "no cluster of the file: set it to 0",
                                      (Patch(h.refcount_table_offset + 8 * b, bytes(8), "reftable"),)))
            p.slots_fixed += 1
    for b in range(nblocks) if mode != "leaks" else ():
        seg = refs[b * per:(b + 1) * per]
        if b < len(rt) and bad[b] and offs[b]:
            need.add(b)
        elif seg.any() and (b >= len(rt) or offs[b] == 0):
            need.add(b)
    if mode == "leaks" and need:
        raise QcowError("ERROR need to rebuild refcount structures (use -r all or qdebug repair)")
    new_size = None
    if need:
        # new blocks at the end of the file; they describe themselves, perhaps in a new block too
        next_cl = nb_file
        new_blocks: dict[int, int] = {}
        todo = sorted(need)
        while todo:
            b = todo.pop(0)
            if b >= len(rt):
                raise QcowError(f"refcount table has {len(rt)} entries, block {b} needs a bigger table: "
                                "not supported (use qemu-img check -r all, which rebuilds the structure)")
            new_blocks[b] = next_cl
            # the slot's old block is no longer referenced through it
            if offs[b] > 0 and not ((rt[b] & _U64(C.REFT_RESERVED_MASK)) or offs[b] % cs or
                                    (offs[b] >> p.cb) >= len(p.report.references)):  # HX: bit 63 is < 0
                old = offs[b] >> p.cb
                if refs[old] > 0:  # (a reference the check never counted is not taken away: no -1)
                    refs[old] -= 1
            if next_cl >= len(refs):
                refs = np.concatenate([refs, np.zeros(next_cl + 1 - len(refs), np.int64)])
            refs[next_cl] += 1
            next_cl += 1
            nb = next_cl // per
            if nb not in new_blocks and nb not in todo and (nb >= len(rt) or bad[nb] or offs[nb] == 0):
                todo.append(nb)
        p.slots_fixed += sum(1 for b in new_blocks if b < len(rt) and offs[b])
        for b, c in new_blocks.items():
            bad[b] = False
            good_off[b] = c * cs
        new_size = next_cl * cs
    refmax = (1 << h.refcount_bits) - 1
    if h.refcount_bits < 63 and (refs > refmax).any():
        c = int(np.flatnonzero(refs > refmax)[0])
        p.unfixed += 1
        p.unsupported.append(f"host cluster {c} has {int(refs[c])} references, more than {h.refcount_bits}-bit "
                             "refcounts hold (use qemu-img amend -o refcount_bits=...)")
        refs = np.minimum(refs, refmax)
    total = len(refs)
    leaks = corr = 0
    p.final_refs = refs
    p.final_blocks = good_off
    nblocks = -(-total // per)
    for b in range(nblocks):
        lo, hi = b * per, min(total, (b + 1) * per)
        want = refs[lo:hi]
        boff = int(good_off[b]) if b < len(good_off) else 0
        if boff == 0:
            continue
        fresh = b in (new_blocks if need else {})
        if fresh:
            values = np.zeros(per, dtype=np.uint64)
            values[:hi - lo] = want
            p.items.append(RepairItem(None, f"write a new refcount block {b} at 0x{boff:x} (the old one was "
                                      f"{'missing' if not offs[b] else 'broken'})",
                                      (Patch(boff, pack_refcounts(values, h.refcount_order), "refblock"),
                                       Patch(h.refcount_table_offset + 8 * b, struct.pack(">Q", boff), "reftable"))))
            have = np.zeros(hi - lo, np.int64)
            if offs[b] and not bad_original(rt[b], cs):
                vals = ctx.block_values(b)
                if vals is not None:
                    have = vals[:hi - lo].astype(np.int64)
        else:
            vals = ctx.block_values(b)
            have = vals[:hi - lo].astype(np.int64)
        diff = np.flatnonzero(have != want)
        if mode == "leaks":
            diff = diff[have[diff] > want[diff]]
        if diff.size == 0:
            continue
        nleak = int((have[diff] > want[diff]).sum())
        leaks += nleak
        corr += int(diff.size) - nleak
        if fresh:
            continue
        values = vals.copy()
        values[diff] = want[diff].astype(np.uint64)
        patches = _block_patches(boff, values, diff, h.refcount_order)
        first = [f"cluster {lo + k}: {int(have[k])} -> {int(want[k])}" for k in diff[:4].tolist()]
        p.items.append(RepairItem(None, f"refcount block {b}: set {diff.size} refcount(s) to the references ("
                                  + ", ".join(first) + (", ..." if diff.size > 4 else "") + ")", tuple(patches)))
    return leaks, corr + p.slots_fixed, new_size


def bad_original(entry, cs) -> bool:
    e = int(entry)
    return bool(e & C.REFT_RESERVED_MASK) or (e & C.REFT_OFFSET_MASK) % cs != 0


def _block_patches(boff: int, values: np.ndarray, changed: np.ndarray, order: int) -> list[Patch]:
    """Patches covering the changed entries of one block: contiguous byte runs of the packed block."""
    data = pack_refcounts(values, order)
    bits = 1 << order
    first = changed * bits // 8
    last = (changed * bits + bits - 1) // 8
    runs = []
    for a, b in zip(first.tolist(), last.tolist()):
        if runs and a <= runs[-1][1] + 16:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
    return [Patch(boff + a, data[a:b + 1], "refblock") for a, b in runs]


def _plan_copied(p: _Planner, mode: str) -> int:
    """COPIED flags (active L1 and L2) := refcount == 1, with the refcounts as repaired."""
    img, h, cs, cb = p.img, p.h, p.cs, p.cb
    refs = getattr(p, "final_refs", None)
    ctx = _Ctx(img, None)

    def rc_of(clusters: np.ndarray) -> np.ndarray:
        clusters = np.asarray(clusters, dtype=np.int64)
        out, _ok = ctx.ondisk(clusters)
        out = out.astype(np.int64)
        if refs is not None:
            inside = clusters < len(refs)
            out[inside] = refs[clusters[inside]]
        return out

    fixed = 0
    l1 = img.l1.astype(np.uint64).copy()
    for i, v in p.l1_fixed.items():
        l1[i] = v
    used = np.flatnonzero(l1 & _U64(C.L1E_OFFSET_MASK))
    if used.size == 0:
        return 0
    l2offs = (l1[used] & _U64(C.L1E_OFFSET_MASK)).astype(np.int64)
    rc = rc_of(l2offs >> cb)
    copied = (l1[used] & _U64(C.QCOW_OFLAG_COPIED)) != 0
    for k in np.flatnonzero((rc == 1) != copied).tolist():
        i = int(used[k])
        new = int(l1[i]) | C.QCOW_OFLAG_COPIED if rc[k] == 1 else int(l1[i]) & ~C.QCOW_OFLAG_COPIED
        fixed += 1
        p.items.append(RepairItem(None, f"L1 index {i}: {'set' if rc[k] == 1 else 'clear'} COPIED (L2 table refcount "
                                  f"{int(rc[k])})", (Patch(h.l1_table_offset + 8 * i, struct.pack(">Q", new), "L1"),)))
    esz = h.l2_entry_size
    for k, l2 in enumerate(l2offs.tolist()):
        tab = ctx.u64s(l2, cs // 8).astype(np.uint64).copy()
        w0 = tab[0::2] if h.extended_l2 else tab
        bm = tab[1::2] if h.extended_l2 else np.zeros_like(tab)
        # planned entry fixes override what is on disk
        override = [(o, v) for o, v in p.entries.items() if l2 <= o < l2 + cs]
        for o, (nw0, nbm) in override:
            j = (o - l2) // esz
            w0[j] = nw0
            bm[j] = nbm
        normal = ((w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) == 0) & ((w0 & _U64(C.L2E_OFFSET_MASK)) != 0)
        if not normal.any():
            continue
        js = np.flatnonzero(normal)
        drc = rc_of(((w0[js] & _U64(C.L2E_OFFSET_MASK)) >> _U64(cb)).astype(np.int64))
        cop = (w0[js] & _U64(C.QCOW_OFLAG_COPIED)) != 0
        wrong = js[(drc == 1) != cop]
        if wrong.size == 0:
            continue
        flip = np.where(drc[(drc == 1) != cop] == 1, True, False)
        patches = []
        for j, setit in zip(wrong.tolist(), flip.tolist()):
            nw = int(w0[j]) | C.QCOW_OFLAG_COPIED if setit else int(w0[j]) & ~C.QCOW_OFLAG_COPIED
            off = l2 + j * esz
            p.entries[off] = (nw, int(bm[j]))
            patches.append(Patch(off, struct.pack(">Q", nw), "L2"))
        fixed += len(patches)
        p.items.append(RepairItem(None, f"L2 table at 0x{l2:x} (L1 index {int(used[k])}): fix COPIED of "
                                  f"{len(patches)} entr{'y' if len(patches) == 1 else 'ies'} to match refcounts",
                                  tuple(patches)))
    return fixed


# ---- applying --------------------------------------------------------------------------------------
def apply_repair(chain, plan: RepairPlan, *, journal=None) -> int:
    """Write `plan` to `chain.top` (opened writable) in one journal step; returns the step number.

    The image is locked like a QEMU writer for the duration; any failure rolls the step back.
    """
    from ..file.journal import Journal, JournalError, JournalUnavailable
    from ..file.locking import lock_chain, release_all

    img = chain.top
    if not img.writable:
        raise QcowError(f"{img.path}: opened read-only; cannot repair")
    locks = lock_chain(chain, write=True)
    own = journal is None
    try:
        jr = journal or Journal(img)
    except JournalUnavailable as e:
        release_all(locks)
        raise JournalError(f"{e}: a repair writes through the undo journal, so nothing was repaired "
                           "(copy the image where a file can be created beside it)") from None
    except BaseException:
        release_all(locks)
        raise
    try:
        step = jr.begin({"op": "repair", "policy": plan.policy, "items": len(plan.items)})
        try:
            if plan.new_size is not None and plan.new_size > img.file_size:
                img.truncate(plan.new_size)
            for patch in plan.patches:
                img.pwrite(patch.offset, patch.data)
            os_fsync(img)
            jr.commit()
        except BaseException:
            jr.abort()
            raise
        img.reload_header()
        return step
    finally:
        if own:
            jr.close() if hasattr(jr, "close") else None
        release_all(locks)


def os_fsync(img) -> None:
    from ..file.fileio import fsync

    fsync(img.fd, img.path)


def check_repair(chain, fix: str, *, filename: str | None = None, before: CheckReport | None = None):
    """`qemu-img check -r leaks|all`: (report before, plan, final report with the fixed counts).

    Like qemu-img, the final report is a second check after the repair, carrying the numbers of
    leaks and corruptions the repair fixed. Raises QcowError where qemu-img fails ("need to
    rebuild" with -r leaks). Compressed data referenced by a broken entry is never freed.
    """
    from dataclasses import replace

    img = chain.top
    name = filename or img.path
    before = replace(before or check_image(img), filename=name)
    plan = plan_repair(chain, before, mode=fix)
    final = before
    if plan.items:
        apply_repair(chain, plan)
        final = replace(check_image(img), filename=name)
    if plan.leaks_fixed or plan.corruptions_fixed:
        final = replace(final, leaks_fixed=plan.leaks_fixed, corruptions_fixed=plan.corruptions_fixed)
    return before, plan, final


def leaked_guest_data(img, report: CheckReport) -> list[int]:
    """Host offsets of the leaked clusters (refcount > 0, no reference) a leak repair would free
    whose content looks like guest data: a lost table's data, for `salvage --orphans` to save."""
    from ..forensics.guess import Guess, guess_clusters
    from ..forensics.source import ImageFile

    leaked = np.array(sorted({f.cluster for f in report.findings if f.kind is FindingKind.LEAK and not f.reference
                              and f.cluster is not None}), dtype=np.int64)
    leaked = leaked[leaked * img.cluster_size < img.file_size]
    if not len(leaked):
        return []
    g = guess_clusters(ImageFile.of(img), leaked)
    return [int(c) * img.cluster_size for c in leaked[g == Guess.DATA]]


def repair_image(chain, *, policy: str = "keep-data", entries=None, mode: str = "qdebug", dry_run: bool = False):
    """Check, plan, (apply), check again: (plan, report before, report after or None)."""
    before = check_image(chain.top)
    plan = plan_repair(chain, before, policy=policy, entries=entries, mode=mode)
    if dry_run or not plan.items:
        return plan, before, None
    apply_repair(chain, plan)
    return plan, before, check_image(chain.top)


__all__ = ["Patch", "GuestChange", "RepairItem", "RepairPlan", "plan_repair", "apply_repair", "repair_image",
           "check_repair", "repaired_bitmap",
           "POLICIES"]
