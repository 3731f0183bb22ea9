"""QEMU 7.2's host cluster allocator, so that qdebug picks the host offsets QEMU would pick.

State kept in memory only, as QEMU keeps it per process: `free_cluster_index` (0 at every open,
first-fit never moving backwards, lowered when a cluster's refcount drops to 0) and
`free_byte_offset` (where the next compressed cluster is packed). Refcount updates follow
update_refcount / alloc_refcount_block: a missing refcount block is allocated first-fit *after*
the run that needed it, written, hooked into the refcount table, and the whole allocation is
retried ("EAGAIN") from the start of the run. Reads and writes go through a `Txn` (one step's
buffered changes), so the same code plans and executes.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptImage
from ..format import constants as C
from ..format.compression import descriptor_fields
from ..format.header import FIELD
from ..format.refcounts import pack_refcounts, unpack_refcounts
from .txn import FLUSH_L2, FLUSH_REFCOUNT, REFCOUNT_AFTER_L2, UINT, Txn

_REFTABLE_FIELD = FIELD["refcount_table_offset"]
_REFTABLE_CLUSTERS = FIELD["refcount_table_clusters"]
assert _REFTABLE_CLUSTERS.offset == _REFTABLE_FIELD.offset + _REFTABLE_FIELD.width

class RefcountTableTooBig(CorruptImage):
    """QEMU's -EFBIG from alloc_refcount_block: the host offset is beyond any refcount table."""


class _Again(Exception):
    """QEMU's -EAGAIN: a refcount block was just allocated, restart the free-cluster search."""


class AllocatorState:
    """What a qemu-io process remembers between requests (restored on undo). Treated as immutable.
    One is made for every step: a plain class, because compiled, a dataclass's generated __init__
    stays interpreted (0.6 us a step)."""

    __slots__ = ("free_cluster_index", "free_byte_offset", "byte_cluster_freed")

    def __init__(self, free_cluster_index: int = 0, free_byte_offset: int = 0, byte_cluster_freed: bool = False):
        self.free_cluster_index = free_cluster_index
        self.free_byte_offset = free_byte_offset
        self.byte_cluster_freed = byte_cluster_freed

    def _key(self) -> tuple[int, int, bool]:
        return self.free_cluster_index, self.free_byte_offset, self.byte_cluster_freed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllocatorState) and self._key() == other._key()

    def __repr__(self) -> str:
        return "AllocatorState(free_cluster_index={}, free_byte_offset={}, byte_cluster_freed={})".format(*self._key())


class Allocator:
    def __init__(self, txn: Txn):
        self.free_cluster_index = 0
        self.free_byte_offset = 0
        # Set when the cluster free_byte_offset points into drops to refcount 0 (QEMU keeps
        # packing into it anyway: the compressed-packing corruption that replay flags as a hazard,
        # engine.check.signatures' compressed-into-data-cluster).
        self.byte_cluster_freed = False
        h = txn.img.header
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.order = h.refcount_order
        self.rbits = h.refcount_bits
        self.per_block = h.refcount_block_entries
        self.refcount_max = (1 << self.rbits) - 1
        self._zero_block = np.zeros(self.per_block, dtype=np.uint64)
        self.reftable_offset = h.refcount_table_offset
        self.reftable_len = h.refcount_table_clusters * h.cluster_size // 8
        self._unpack = lambda buf: unpack_refcounts(buf, self.order)
        self._header = h
        self._kept: dict[int, np.ndarray] = {}
        self._boff_header: object = None
        self.begin(txn)

    def begin(self, txn: Txn, *, keep_cache: bool = False) -> None:
        """Start a new step with a fresh Txn.

        keep_cache: go on with the refcount values of the earlier steps (those steps ran through
        this allocator, which kept the values up to date). Otherwise, or when the header was
        re-read (a header write, or an undo that changed the file behind our back), they are
        read again. A pure plan never keeps them: its changes must not outlive it.
        """
        self.txn = txn
        h = txn.img.header
        if h is not self._header:
            self._header = h
            self.reftable_offset = h.refcount_table_offset
            self.reftable_len = h.refcount_table_clusters * h.cluster_size // 8
            self._kept = {}
        if keep_cache and txn.applying:
            # Only views of the file carry over (they follow every write, a repair's included);
            # copies would miss writes made between steps by someone else.
            self._kept = {off: v for off, v in self._kept.items() if not v.flags.owndata}
        # refcount block offset -> values (views of the file, or copies this allocator updates)
        self._cache: dict[int, np.ndarray] = self._kept if keep_cache else {}
        if not (keep_cache and not txn.applying) or h is not self._boff_header:
            # reftable index -> refcount block offset; kept across the steps of a simulation or
            # write-back, where every reftable change is this allocator's own
            self._boff: dict[int, int] = {}
            self._boff_header = h
        self.freed: list[tuple[int, int]] = []  # (host offset, length) of every refcount decrement
        # Clusters a guest discard request freed (QCOW2_DISCARD_REQUEST: qemu-io opens images with
        # BDRV_O_UNMAP, so QEMU passes the discard down to the image file, a punched hole).
        self.discards: list[int] = []
        self.stale_pack = False
        # Refcount transitions of this step, for its cost: cluster index c when its refcount went
        # 0 -> non-zero, ~c when it went to 0; and the refcount blocks it allocated.
        self.transitions: list[int] = []
        self.new_refblocks: list[int] = []

    # ---- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> AllocatorState:
        return AllocatorState(self.free_cluster_index, self.free_byte_offset, self.byte_cluster_freed)

    def drop_caches(self) -> None:
        """The file may have changed outside this allocator (an undo): read refcounts again."""
        self._kept = {}
        self._boff_header = None

    def restore_state(self, state: AllocatorState) -> None:
        self.free_cluster_index = state.free_cluster_index
        self.free_byte_offset = state.free_byte_offset
        self.byte_cluster_freed = state.byte_cluster_freed

    # ---- refcount reads ------------------------------------------------------------------------
    def _block_offset(self, block: int) -> int:
        off = self._boff.get(block)
        if off is None:
            if block >= self.reftable_len:
                return 0
            off = self._boff[block] = self.txn.u64(self.reftable_offset + 8 * block) & C.REFT_OFFSET_MASK
        return off

    def block_values(self, block: int) -> np.ndarray:
        """Refcounts of one refcount block (zeros if the block does not exist)."""
        off = self._block_offset(block)
        if not off:
            return self._zero_block
        if off % self.cs:
            raise CorruptImage(f"refblock offset 0x{off:x} unaligned (reftable index: 0x{block:x})")
        return self._values_at(off)

    def _values_at(self, off: int) -> np.ndarray:
        vals = self._cache.get(off)
        if vals is None:
            vals = self.txn.refcount_block(off, self._unpack)
            if not self._live(vals):
                vals = np.array(vals, dtype=np.uint64)
            self._cache[off] = vals
        return vals

    def _live(self, vals: np.ndarray) -> bool:
        """A view of the file itself (executing, >= 8-bit refcounts): it follows every pwrite."""
        return self.txn.applying and self.order >= 3 and not vals.flags.owndata

    def get_refcount(self, cluster_index: int) -> int:
        block, idx = cluster_index // self.per_block, cluster_index % self.per_block
        return int(self.block_values(block)[idx])

    # ---- refcount writes -----------------------------------------------------------------------
    def _write_entries(self, block_off: int, i0: int, values) -> None:
        """Write refcount entries [i0, i0+len) of the block at block_off (read-modify-write of partial bytes).

        `values`: an array, or a list of ints already checked to fit (the per-request case: packed
        without numpy)."""
        bits = self.rbits
        b0 = i0 * bits // 8
        if bits >= 8 and isinstance(values, list) and len(values) == 1:  # one update: the usual case
            self.txn.write_uint(block_off + b0, values[0], UINT[bits // 8], "refblock")
        else:
            self.txn.write_meta(block_off + b0, self._packed(block_off, b0, i0, values), "refblock")
        cached = self._cache.get(block_off)
        if cached is not None and not self._live(cached):
            try:
                self._set_cached(cached, i0, values)
            except ValueError:  # a read-only view of the file: this allocator's copy from now on
                cached = self._cache[block_off] = np.array(cached, dtype=np.uint64)
                self._set_cached(cached, i0, values)

    def _packed(self, block_off: int, b0: int, i0: int, values) -> bytes:
        """The bytes from b0 on that hold entries [i0, i0+len(values)) with their new values (the
        neighbours sharing their bytes, for refcounts narrower than a byte, as they are)."""
        bits = self.rbits
        if bits >= 8 and isinstance(values, list):
            return b"".join([v.to_bytes(bits // 8, "big") for v in values])
        if bits >= 8:
            return pack_refcounts(values, self.order)
        b1 = -(-(i0 + len(values)) * bits // 8)
        cur = unpack_refcounts(self.txn.pread(block_off + b0, b1 - b0), self.order)
        s = i0 - b0 * (8 // bits)
        cur[s:s + len(values)] = values
        return pack_refcounts(cur, self.order)

    @staticmethod
    def _set_cached(cached: np.ndarray, i0: int, values) -> None:
        if len(values) == 1:
            cached[i0] = values[0]
        else:
            cached[i0:i0 + len(values)] = values

    def update_refcount(self, first_cluster: int, count: int, addend: int, undo: bool = False,
                        discard: bool = False) -> None:
        """Add `addend` (+n or -n) to `count` clusters; may raise _Again after undoing itself.
        discard: a guest discard request's free (clusters reaching 0 are listed in `discards`)."""
        if addend < 0:
            self.txn.op(REFCOUNT_AFTER_L2)  # update_refcount: a decrease waits for the L2 entries
            if not undo:
                self.freed.append((first_cluster << self.cbits, count << self.cbits))
        done = 0
        try:
            while done < count:
                ci = first_cluster + done
                block, idx = ci // self.per_block, ci % self.per_block
                n = min(count - done, self.per_block - idx)
                block_off = self._block_offset(block)
                if not block_off:
                    try:
                        block_off = self._alloc_refcount_block(ci)
                    except _Again:
                        self.free_cluster_index = min(self.free_cluster_index, first_cluster)
                        raise
                cur = self.block_values(block)
                if n == 1:  # the usual case, cheaper without numpy
                    v = cur.item(idx) + addend
                    vals = [v]
                    bad_value = v < 0 or v > self.refcount_max
                else:
                    if n <= 4:
                        vals = [v + addend for v in cur[idx:idx + n].tolist()]
                    else:
                        vals = (cur[idx:idx + n].astype(np.int64) + addend).tolist()
                    bad_value = min(vals) < 0 or max(vals) > self.refcount_max
                if bad_value:
                    bad = ci + next(i for i, v in enumerate(vals) if v < 0 or v > self.refcount_max)
                    raise CorruptImage(f"refcount of host cluster {bad} (0x{bad << self.cbits:x}) would leave "
                                       f"0..{self.refcount_max}")
                self._write_entries(block_off, idx, vals)
                if addend > 0:
                    if n == 1:
                        if vals[0] == addend:
                            self.transitions.append(ci)
                    else:
                        self.transitions.extend([ci + i for i, v in enumerate(vals) if v == addend])
                elif 0 in vals:
                    self.transitions.extend([~(ci + i) for i, v in enumerate(vals) if v == 0])
                    if discard:
                        self.discards.extend((ci + i) << self.cbits for i, v in enumerate(vals) if v == 0)
                    z = vals.index(0)
                    self.free_cluster_index = min(self.free_cluster_index, ci + z)
                    if self.free_byte_offset:
                        fb = (self.free_byte_offset >> self.cbits) - ci
                        if 0 <= fb < n and vals[fb] == 0:
                            self.byte_cluster_freed = True
                done += n
        except _Again:
            if done:
                self.update_refcount(first_cluster, done, -addend, undo=True)
            raise

    def _alloc_refcount_block(self, cluster_index: int) -> int:
        """A refcount block for `cluster_index` (alloc_refcount_block); always ends in _Again."""
        block = cluster_index // self.per_block
        self.txn.op(FLUSH_L2)  # "We write to the refcount table, so we might depend on L2 tables"
        new_block = self.alloc_clusters_noref(1) << self.cbits
        if new_block == 0:
            raise CorruptImage("preventing invalid allocation of refcount block at offset 0")
        new_index = new_block >> self.cbits
        if new_index // self.per_block == block:
            buf = np.zeros(self.per_block, dtype=np.uint64)
            buf[new_index % self.per_block] = 1
            data = pack_refcounts(buf, self.order)
        else:
            self.update_refcount(new_index, 1, 1)
            self.txn.op(FLUSH_REFCOUNT)
            data = bytes(self.cs)
        self.txn.write_meta(new_block, data, "refblock")
        self.txn.op(FLUSH_REFCOUNT)  # the new block is written before the refcount table points at it
        self.new_refblocks.append(new_block)
        self._cache[new_block] = unpack_refcounts(data, self.order)
        if block < self.reftable_len:
            self.txn.write_u64(self.reftable_offset + block * 8, new_block, "reftable")
            self._boff[block] = new_block
            raise _Again()
        blocks_used = -(-max(cluster_index + 1, new_index + 1) // self.per_block)
        if blocks_used > C.QCOW_MAX_REFTABLE_SIZE // 8:
            # HX: QEMU's alloc_refcount_block returns -EFBIG here (a garbage offset would otherwise
            # grow the refcount table to petabytes: gigabytes of Python lists).
            raise RefcountTableTooBig(
                f"host cluster 0x{cluster_index << self.cbits:x} needs a refcount table of {blocks_used} blocks, "
                f"more than QEMU's limit ({C.QCOW_MAX_REFTABLE_SIZE // 8}): EFBIG")
        self._refcount_area(blocks_used * self.per_block * self.cs, block, new_block)
        raise _Again()

    def _metadata_blocks(self, clusters: int, generous: bool = True) -> int:
        """qcow2_refcount_metadata_size (generous: room for a 1.5x table): the refcount block count."""
        per_table = self.cs // 8
        table = blocks = n = 0
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // self.per_block)
            table = -(-blocks // per_table)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n = 0
                generous = False
            if n == last:
                return blocks

    def refcount_area(self, start: int, additional: int) -> int:
        """qcow2_refcount_area sized exactly for the clusters below `start` plus `additional` more
        (preallocation reserves them up front); the end of the new refcount structures."""
        return self._refcount_area(start, 0, 0, additional, exact=True)

    def _refcount_area(self, start: int, new_index: int, new_block: int, additional: int = 0,
                       exact: bool = False) -> int:
        """qcow2_refcount_area: a bigger refcount table plus self-describing refcount blocks at `start`."""
        cs = self.cs
        total = self._metadata_blocks(start // cs + additional, not exact)
        if total > C.QCOW_MAX_REFTABLE_SIZE:
            raise RefcountTableTooBig(f"a refcount table of {total} entries is more than QEMU's limit: EFBIG")
        area_index = (start // cs) // self.per_block
        table_size = total if exact else total + -(-total // 2)
        table_size = -(-table_size // (cs // 8)) * (cs // 8)
        table_clusters = table_size * 8 // cs
        new_table = [0] * table_size
        for i in range(min(self.reftable_len, table_size)):
            new_table[i] = self.txn.u64(self.reftable_offset + 8 * i) & C.REFT_OFFSET_MASK
        if new_block:
            new_table[new_index] = new_block
        new_blocks = sum(1 for i in range(area_index, total) if not new_table[i])
        table_offset = start + new_blocks * cs
        end_offset = table_offset + table_clusters * cs
        block_offset = start
        for i in range(area_index, total):
            if new_table[i]:
                off = new_table[i]
                vals = np.array(self._values_at(off), dtype=np.uint64)
                fresh = False
            else:
                off = new_table[i] = block_offset
                block_offset += cs
                vals = np.zeros(self.per_block, dtype=np.uint64)
                fresh = True
            first = i * self.per_block * cs
            if first < end_offset:
                j0 = (start - first) // cs if first < start else 0
                j1 = min((end_offset - first) // cs, self.per_block)
                vals[j0:j1] = 1
            if fresh:
                self.txn.write_meta(off, pack_refcounts(vals, self.order), "refblock")
                self._cache[off] = vals
                self.new_refblocks.append(off)
            elif first < end_offset:
                self._write_entries(off, j0, vals[j0:j1])
        self.txn.op(FLUSH_REFCOUNT)  # qcow2_refcount_area: the blocks before the table that lists them
        self.txn.write_meta(table_offset, b"".join(v.to_bytes(8, "big") for v in new_table), "reftable")
        # refcount_table_offset and refcount_table_clusters are adjacent: one header write, as QEMU's
        self.txn.write_meta(_REFTABLE_FIELD.offset, _REFTABLE_FIELD.pack(table_offset) + _REFTABLE_CLUSTERS.pack(
            table_clusters), "header")
        old_offset, old_len = self.reftable_offset, self.reftable_len
        self.reftable_offset, self.reftable_len = table_offset, table_size
        self._boff = {}
        self.free_clusters(old_offset, old_len * 8)
        return end_offset

    # ---- allocation ----------------------------------------------------------------------------
    def alloc_clusters_noref(self, n: int) -> int:
        """First run of `n` free clusters at or after free_cluster_index (cluster index)."""
        start = self.free_cluster_index
        block = start // self.per_block
        idx = start % self.per_block
        if idx + n <= self.per_block and block < self.reftable_len and not (
                self.block_values(block)[idx] if n == 1 else np.count_nonzero(self.block_values(block)[idx:idx + n])):
            self.free_cluster_index = start + n  # the common case: the run starts right here
            return start
        run_start, run = start, 0
        table_len = self.reftable_len
        chunk = max(1024, 2 * n)
        while True:
            if block >= table_len:
                result = run_start if run else block * self.per_block + idx
                break
            # Look at a chunk at a time: the first free run is usually close to the search start;
            # when it is not (the index fell back into a full region), the chunks grow.
            vals = self.block_values(block)[idx:idx + chunk]
            chunk = min(chunk * 4, self.per_block)
            used = vals.nonzero()[0]
            base = block * self.per_block + idx
            if len(used) == 0:
                if not run:
                    run_start = base
                run += len(vals)
                if run >= n:
                    result = run_start
                    break
            elif len(used) == len(vals):  # all in use: the run (if any) is broken, go on
                run = 0
            else:
                if run + int(used[0]) >= n:
                    result = run_start if run else base
                    break
                gaps = np.diff(used) - 1
                ok = np.flatnonzero(gaps >= n)
                if len(ok):
                    result = base + int(used[ok[0]]) + 1
                    break
                last = int(used[-1])
                run = len(vals) - last - 1
                run_start = base + last + 1
                if run >= n:
                    result = run_start
                    break
            idx += len(vals)
            if idx >= self.per_block:
                block += 1
                idx = 0
        self.free_cluster_index = result + n
        return result

    def alloc_clusters(self, n: int) -> int:
        """qcow2_alloc_clusters: host offset of `n` new clusters with refcount 1."""
        while True:
            ci = self.alloc_clusters_noref(n)
            try:
                self.update_refcount(ci, n, 1)
                return ci << self.cbits
            except _Again:
                continue

    def alloc_clusters_at(self, offset: int, n: int) -> int:
        """qcow2_alloc_clusters_at: how many of the `n` clusters from `offset` were free and are now taken."""
        while True:
            ci = offset >> self.cbits
            k = 0
            while k < n and self.get_refcount(ci + k) == 0:
                k += 1
            if not k:
                return 0
            try:
                self.update_refcount(ci, k, 1)
                return k
            except _Again:
                continue

    def alloc_bytes(self, size: int) -> int:
        """qcow2_alloc_bytes: byte offset for `size` bytes of compressed data, packed per process."""
        cs = self.cs
        offset = self.free_byte_offset
        if offset and self.get_refcount(offset >> self.cbits) == self.refcount_max:
            offset = 0
        packed_cluster = offset >> self.cbits if offset else -1
        free_in_cluster = cs - offset % cs
        while True:
            if not offset or free_in_cluster < size:
                new_cluster = self.alloc_clusters_noref(1) << self.cbits
                if new_cluster == 0:
                    raise CorruptImage("preventing invalid allocation of compressed cluster at offset 0")
                if not offset or -(-offset // cs) * cs != new_cluster:
                    offset = new_cluster
                    free_in_cluster = cs
                else:
                    free_in_cluster += cs
            first = offset >> self.cbits
            last = (offset + size - 1) >> self.cbits
            try:
                self.update_refcount(first, last - first + 1, 1)
                break
            except _Again:
                offset = 0
        # QEMU trusts free_byte_offset: if its cluster was freed (and maybe reused) meanwhile, the
        # compressed bytes land in someone else's cluster. Remember that for the hazard check.
        self.stale_pack = self.byte_cluster_freed and (offset >> self.cbits) == packed_cluster
        end = offset + size
        self.free_byte_offset = end if end % cs else 0
        if (end >> self.cbits) != packed_cluster:
            self.byte_cluster_freed = False
        return offset

    def free_clusters(self, offset: int, length: int, *, discard: bool = False) -> None:
        first = offset >> self.cbits
        last = (offset + length - 1) >> self.cbits
        try:
            self.update_refcount(first, last - first + 1, -1, discard=discard)
        except (_Again, RefcountTableTooBig):
            # HX: freeing a cluster whose refcount block is missing: QEMU's qcow2_free_clusters logs
            # "qcow2_free_clusters failed" and goes on (the cluster leaks; the new block stays).
            pass

    def free_any_cluster(self, word0: int, *, request: bool = False) -> None:
        """qcow2_free_any_cluster: drop the reference an L2 entry holds (compressed: its bytes).
        request: a guest discard (QCOW2_DISCARD_REQUEST): clusters it frees are listed in `discards`."""
        if word0 & C.QCOW_OFLAG_COMPRESSED:
            off, nbytes = descriptor_fields(word0, self.cbits)
            self.free_clusters(off, nbytes, discard=request)
            return
        off = word0 & C.L2E_OFFSET_MASK
        if off:
            if off % self.cs:
                return  # QEMU: "Cannot free unaligned cluster" (signalled, nothing freed)
            self.free_clusters(off, self.cs, discard=request)
