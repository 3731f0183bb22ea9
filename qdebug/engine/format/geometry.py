"""An image's layout constants (cluster and subcluster sizes, L1 / L2 shapes, QEMU's L2 slice),
derived once from its header: the write path and the guest view read them for every request,
and plain attributes cost far less than the header's derived properties."""

from __future__ import annotations

from .header import Header

L2_CACHE_DEFAULT = 32 << 20  # QEMU's default L2 cache size (DEFAULT_L2_CACHE_MAX_SIZE)


class Geometry:
    __slots__ = ("header", "cs", "cbits", "ext", "esize", "l2_entries", "nsc", "sc_size", "sc_bits", "size",
                 "version", "compression_type", "l1_offset", "l1_size", "slice_entries")

    def __init__(self, header: Header, size: int):
        h = self.header = header
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.ext = h.extended_l2
        self.esize = h.l2_entry_size
        self.l2_entries = h.l2_entries
        self.nsc = h.subclusters_per_cluster
        self.sc_size = h.subcluster_size
        self.sc_bits = h.subcluster_bits
        self.size = size  # the virtual size as the block layer sees it (whole sectors)
        self.version = h.version
        self.compression_type = h.compression_type
        self.l1_offset = h.l1_table_offset
        self.l1_size = h.l1_size
        # QEMU's L2 cache: whole tables when the default cache covers the disk, else 4 KiB slices
        # (zero and discard walk the L2 table a slice at a time, and a request stops at a slice end).
        max_l2_cache = -(-(-(-self.size // self.cs) * self.esize) // self.cs) * self.cs
        entry = self.cs if max_l2_cache <= L2_CACHE_DEFAULT else min(self.cs, 4096)
        self.slice_entries = entry // self.esize
