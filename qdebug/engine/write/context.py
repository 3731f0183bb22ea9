"""`StepContext`: one command's view of the image while it runs: geometry, L1/L2 access through
the Txn, and get_cluster_table (which allocates an L2 table, or copies one shared with a snapshot,
exactly when QEMU does). What the step does is recorded in its `StepTrace` (`ctx.trace`).
"""

from __future__ import annotations

import struct
from typing import Final

from ..file.chain import Chain
from ..format import constants as C
from ..format.geometry import Geometry
from ..format.header import FIELD
from ..read.guestview import TopEntries
from .allocator import Allocator
from .step import StepTrace
from .txn import FLUSH_L2, FLUSH_REFCOUNT, Txn

_QQ = struct.Struct(">QQ")
_INCOMPAT: Final = FIELD["incompatible_features"].offset


class StepFailed(Exception):
    """The command fails the way QEMU fails it (message as qemu-io prints it after 'write failed: ')."""


class StepContext(TopEntries):
    def __init__(self, chain: Chain, geo: Geometry, has_backing: bool, txn: Txn, alloc: Allocator,
                 trace: StepTrace):
        self.chain = chain
        self.g = geo
        self.has_backing = has_backing
        self.txn = txn
        self.alloc = alloc
        self.trace = trace
        self.before = trace.before  # guest cluster -> (word0, bitmap) before the step
        self.in_place: list[tuple[int, int]] = []  # (host offset, clusters) written in place (COPIED)
        self.marked_corrupt = False  # QEMU would set the corrupt bit: its driver is gone afterwards
        self.decompressed: dict = {}  # compressed clusters decompressed for COW in this step
        # whatif --policy minimal-cow (NOT QEMU; dry runs only): COW only what must be preserved
        self.minimal_cow = False
        self.entries: dict[int, tuple[int, int]] = {}
        self._l1: dict[int, int] = {}  # L1 entries read this step (get_cluster_table keeps it current)

    # ---- L1 / L2 ---------------------------------------------------------------------------------
    def l2_location(self, guest_cluster: int) -> tuple[int, int, int]:
        """(l1 entry, L2 table offset or 0, index in the table) without allocating anything."""
        n = self.g.l2_entries  # (// and % compile to machine arithmetic; divmod does not)
        l1_index, l2_index = guest_cluster // n, guest_cluster % n
        l1e = self._l1.get(l1_index)
        if l1e is None:
            if l1_index >= self.g.l1_size:
                return 0, 0, l2_index
            l1e = self._l1[l1_index] = self.txn.u64(self.g.l1_offset + 8 * l1_index)
        return l1e, l1e & C.L1E_OFFSET_MASK, l2_index

    def entry(self, guest_cluster: int) -> tuple[int, int]:
        """(word0, bitmap) of a guest cluster; (0, 0) where no L2 table exists. Cached for the
        step (every change goes through set_entry), as QEMU's L2 cache would hold it."""
        e = self.entries.get(guest_cluster)
        if e is not None:
            return e
        _l1e, l2_off, idx = self.l2_location(guest_cluster)
        if not l2_off:  # no L2 table: a table made later in the step starts zeroed, so (0, 0) holds
            e = self.entries[guest_cluster] = (0, 0)
            return e
        off = l2_off + idx * self.g.esize
        if self.g.ext:
            page = self.txn.page(off)
            if page is not None:  # a 16-byte entry never straddles a page
                e = _QQ.unpack_from(page, off & 4095)
            elif off + 16 <= self.txn.img.map_len:
                e = _QQ.unpack_from(self.txn.img.mapping, off)
            else:
                e = (self.txn.u64(off), self.txn.u64(off + 8))
        else:
            e = (self.txn.u64(off), 0)
        self.entries[guest_cluster] = e
        return e

    def set_entry(self, l2_off: int, guest_cluster: int, word0: int, bitmap: int) -> None:
        """Write one L2 entry (remembering the cluster's state before the step)."""
        old = self.entry(guest_cluster)
        if guest_cluster not in self.before:
            self.before[guest_cluster] = old
        idx = guest_cluster % self.g.l2_entries
        off = l2_off + idx * self.g.esize
        self.entries[guest_cluster] = (word0, bitmap)
        if self.g.ext:
            if old[0] == word0:
                if old[1] != bitmap:
                    self.txn.write_u64(off + 8, bitmap, "L2")
            elif old[1] == bitmap:
                self.txn.write_u64(off, word0, "L2")
            else:
                self.txn.write_u64_pair(off, word0, bitmap, "L2")
        elif old[0] != word0:
            self.txn.write_u64(off, word0, "L2")

    def touch(self, guest_cluster: int) -> None:
        """Note a cluster whose data (not entry) the step writes."""
        if guest_cluster not in self.before:
            self.before[guest_cluster] = self.entry(guest_cluster)

    def get_cluster_table(self, guest_offset: int) -> int:
        """L2 table offset for `guest_offset`, allocating or un-sharing the table first (QEMU's get_cluster_table)."""
        gc = guest_offset >> self.g.cbits
        l1_index = gc // self.g.l2_entries
        if l1_index >= self.g.l1_size:
            raise StepFailed("Input/output error")
        l1e, l2_off, _ = self.l2_location(gc)
        if l2_off % self.g.cs:
            self.corruption(f"L2 table offset 0x{l2_off:x} unaligned (L1 index: 0x{l1_index:x})")
        if l1e & C.QCOW_OFLAG_COPIED:
            return l2_off
        new = self.alloc.alloc_clusters(1)
        if new == 0:
            self.corruption("Preventing invalid allocation of L2 table at offset 0")
        self.trace.allocations.append((new, self.g.cs, "L2 table"))
        txn = self.txn
        txn.op(FLUSH_REFCOUNT)  # l2_allocate: the new table's refcount is on disk before the table
        table = txn.pread(l2_off, self.g.cs) if l2_off else bytes(self.g.cs)
        txn.write_meta(new, table, "L2")
        txn.op(FLUSH_L2)  # ... and the table (every dirty L2 slice) before the L1 entry
        txn.write_u64(self.g.l1_offset + 8 * l1_index, new | C.QCOW_OFLAG_COPIED, "L1")
        self._l1[l1_index] = new | C.QCOW_OFLAG_COPIED
        if l2_off:
            self.alloc.free_clusters(l2_off, self.g.cs)
            self.trace.notes.append(f"L2 table at 0x{l2_off:x} is shared (snapshot): copied to 0x{new:x}")
        return new

    def rewrite_whole_clusters(self, offset: int, nb: int, rule) -> None:
        """Rewrite the L2 entries of `nb` whole clusters from `offset`, one L2 slice at a time (QEMU's
        discard_in_l2_slice / zero_in_l2_slice walk): `rule(word0, bitmap) -> (word0, bitmap, free)`;
        unchanged entries are left alone, and the old cluster is freed where the rule says so."""
        g = self.g
        while nb > 0:
            l2_off = self.get_cluster_table(offset)
            gc0 = offset >> g.cbits
            n = min(nb, g.slice_entries - gc0 % g.l2_entries % g.slice_entries)
            for gc in range(gc0, gc0 + n):
                w0, bm = self.entry(gc)
                new_w0, new_bm, free = rule(w0, bm)
                if new_w0 == w0 and new_bm == bm:
                    continue
                self.set_entry(l2_off, gc, new_w0, new_bm)
                if free:
                    self.alloc.free_any_cluster(w0, request=True)
            nb -= n
            offset += n * g.cs
        self.pass_discards_down()

    def pass_discards_down(self) -> None:
        """qcow2_process_discards: the clusters a guest discard freed are discarded in the image file
        too (QEMU punches holes: later partial writes into a reused cluster leave zeros around)."""
        alloc = self.alloc
        for host in alloc.discards:
            if alloc.get_refcount(host >> self.g.cbits) == 0:
                self.txn.discard_range(host, self.g.cs)
        alloc.discards = []

    def metadata_overlap(self, off: int, length: int) -> str | None:
        """QEMU's pre-write overlap check ("cached" template): which metadata [off, off+length) hits."""
        g = self.g
        h = self.txn.img.header
        end = off + length

        def hits(start: int, size: int) -> bool:
            return start < end and off < start + size

        if hits(0, g.cs):
            return "qcow2_header"
        if hits(g.l1_offset, g.l1_size * 8):
            return "active L1 table"
        if hits(self.alloc.reftable_offset, self.alloc.reftable_len * 8):
            return "refcount table"
        if h.nb_snapshots and hits(h.snapshots_offset, g.cs):
            return "snapshot table"
        for i in range(g.l1_size):
            l2 = self.txn.u64(g.l1_offset + 8 * i) & C.L1E_OFFSET_MASK
            if l2 and hits(l2, g.cs):
                return "active L2 table"
        for i in range(self.alloc.reftable_len):
            rb = self.txn.u64(self.alloc.reftable_offset + 8 * i) & C.REFT_OFFSET_MASK
            if rb and hits(rb, g.cs):
                return "refcount block"
        return None

    def corruption(self, message: str) -> None:
        """qcow2_signal_corruption(fatal): set the corrupt bit and fail the request with EIO."""
        h = self.txn.img.header
        if h.version >= 3:
            incompat = self.txn.u64(_INCOMPAT) | C.QCOW2_INCOMPAT_CORRUPT
            self.txn.write_u64(_INCOMPAT, incompat, "header")
        self.marked_corrupt = True
        self.trace.notes.append(f"QEMU marks the image corrupt: {message}")
        raise StepFailed(f"Input/output error ({message})")
