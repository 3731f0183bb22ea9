"""The facts about host clusters the known-bug signatures ask for, behind a narrow interface.

TO BE SWITCHED TO THE HOST LAYOUT: the forensics work (`qdebug.engine.forensics.layout`,
`host_layout(image) -> HostLayout`, branch `forensics`) classifies every host cluster by owner,
snapshots included. Until it is merged, `ActiveFacts` answers the same three questions minimally,
from the active L1/L2 tables only (what the signatures need; internal snapshots are not walked):

- `compressed()`: every compressed cluster's guest offset and packed host byte range
  (layout: owners of kind "compressed", `Owner.compressed_offset/length`);
- `data_owner(host_clusters)`: the guest offset whose data cluster each host cluster is, or -1
  (layout: `HostLayout.owners(cluster)` of kind "data");
- `data_past_eof()`: data clusters whose data does not all lie inside the file: with extended L2
  entries only the allocated subclusters count (QEMU leaves the tail of a partly written new
  cluster unwritten, so a healthy file often ends inside its last cluster); zero-only clusters hold
  no data (layout: `problems` rows with `Problem.PAST_EOF` of kind data, and the runs' last data
  cluster against the file size).
"""

from __future__ import annotations

import os
from typing import Iterator, Protocol

import numpy as np

from ..file.image import Image
from ..format import constants as C

_U64 = np.uint64


class HostFacts(Protocol):
    file_size: int
    cluster_size: int

    def compressed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(guest offset, host byte offset, length) of every compressed cluster, as int64."""

    def data_owner(self, host_clusters: np.ndarray) -> np.ndarray:
        """Per host cluster index: the guest offset of the data cluster stored there, or -1."""

    def data_past_eof(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(guest offset, host offset, end of its data in the cluster) of data clusters whose
        data reaches past the end of the file."""


class ActiveFacts:
    """`HostFacts` of the active L1/L2 tables, each question one streaming pass over the tables
    (one reused buffer, read with pread: a damaged 1 TiB image costs no more memory than its
    check). Tables that cannot be read are left out: check reports them."""

    def __init__(self, img: Image):
        h = img.header
        self.img = img
        self.file_size = img.file_size
        self.cluster_size = h.cluster_size
        self._cb, self._n, self._ext = h.cluster_bits, h.l2_entries, h.extended_l2

    def _tables(self) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(guest offset of entry 0, native word 0 and bitmap of every entry) of each active L2 table."""
        l1 = self.img.l1.astype(np.uint64)
        cs, n = self.cluster_size, self._n
        buf = np.empty(n * (2 if self._ext else 1), dtype=">u8")
        raw = buf.view(np.uint8)
        for i in np.flatnonzero(l1 & _U64(C.L1E_OFFSET_MASK)).tolist():
            off = int(l1[i]) & C.L1E_OFFSET_MASK
            if off % cs or off >= self.file_size:
                continue
            got = os.preadv(self.img.fd, [raw[:max(0, min(raw.size, self.file_size - off))]], off)
            raw[got:] = 0
            yield ((i * n) << self._cb, (buf[0::2] if self._ext else buf).astype(np.uint64),
                   buf[1::2].astype(np.uint64) if self._ext else None)

    def compressed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cb = self._cb
        x = 62 - (cb - 8)
        guests, words = [np.zeros(0, np.int64)], [np.zeros(0, np.uint64)]
        for base, w0, bm in self._tables():
            k = np.flatnonzero(w0 & _U64(C.QCOW_OFLAG_COMPRESSED))
            guests.append(base + (k.astype(np.int64) << cb))
            words.append(w0[k])
        cw = np.concatenate(words)
        host = (cw & _U64((1 << x) - 1)).astype(np.int64)
        length = ((cw >> _U64(x)) & _U64((1 << (cb - 8)) - 1)).astype(np.int64) * 512 + 512 - (host & 511)
        return np.concatenate(guests), host, length

    def _data(self, w0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(entry index, host offset) of the data clusters of one table (aligned offsets only)."""
        off = (w0 & _U64(C.L2E_OFFSET_MASK)).astype(np.int64)
        k = np.flatnonzero(((w0 & _U64(C.QCOW_OFLAG_COMPRESSED)) == 0) & (off != 0) & (off % self.cluster_size == 0))
        return k, off[k]

    def data_owner(self, host_clusters: np.ndarray) -> np.ndarray:
        want = np.asarray(host_clusters, dtype=np.int64) * self.cluster_size
        out = np.full(want.shape, -1, dtype=np.int64)
        if not want.size:
            return out
        targets = np.unique(want)
        for base, w0, bm in self._tables():
            k, off = self._data(w0)
            hit = np.isin(off, targets)
            for o, g in zip(off[hit].tolist(), (base + (k[hit].astype(np.int64) << self._cb)).tolist()):
                out[(want == o) & (out < 0)] = g
        return out

    def data_past_eof(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cs = self.cluster_size
        guests, hosts, ends = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for base, w0, bm in self._tables():
            k, off = self._data(w0)
            if bm is None:  # standard L2: the whole cluster, unless it reads as zeros (v3 zero flag)
                end = np.where((w0[k] & _U64(C.QCOW_OFLAG_ZERO)) != 0, 0, cs)
            else:  # the end of the last subcluster with data (allocated, not zero)
                data = (bm[k] & _U64(0xFFFFFFFF)) & ~(bm[k] >> _U64(32))
                end = _top_bit(data) * (cs // 32)
            past = (end > 0) & (off + end > self.file_size)
            guests.append(base + (k[past].astype(np.int64) << self._cb))
            hosts.append(off[past])
            ends.append(end[past].astype(np.int64))
        return np.concatenate(guests), np.concatenate(hosts), np.concatenate(ends)


def _top_bit(v: np.ndarray) -> np.ndarray:
    """Per 32-bit value: 1 + the index of its highest set bit (0 for 0)."""
    out = np.zeros(v.shape, dtype=np.int64)
    v = v.astype(np.uint64)
    for shift in (16, 8, 4, 2, 1):
        big = v >= _U64(1 << shift)
        out[big] += shift
        v = np.where(big, v >> _U64(shift), v)
    return out + (v != 0)
