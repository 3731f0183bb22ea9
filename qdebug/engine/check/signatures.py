"""Known-bug signatures: damage patterns with a known cause, recognised from a check's findings and
the host layout (`forensics.layout.host_layout`: who owns each host cluster, snapshots included),
each said with its evidence and with the QEMU versions measured to produce it. A rule claims
nothing its evidence does not show.

`compressed-into-data-cluster`: compressed data packed into a host cluster that is another guest
  cluster's data cluster. QEMU 7.2.22 and 10.0.2 both do it (measured, one qemu-io process):
  `write -c` packs bytes after the previous compressed cluster through a remembered offset, even
  after a COW freed that host cluster and first-fit allocation reused it as a data cluster; that
  guest cluster's bytes are overwritten. check: "OFLAG_COPIED data cluster ... refcount=2".
`invalid-subcluster-bitmap`: an extended L2 entry both allocated and zero, allocation bits
  without a host offset, or a compressed cluster with a non-zero bitmap. No QEMU version is
  known to write one (7.2.22 and 10.0.2 wrote none in 150 random traces each of writes, zero
  writes, discards and compressed writes); both report them in check, fail reads of the first
  two kinds with EIO, and `qemu-img check -r` frees a compressed cluster with a bitmap as a leak
  (its data is lost): `qdebug repair` keeps it.
`data-past-eof`: data clusters that end past the end of the file: the file is shorter than its
  metadata (a truncated copy or transfer, or a tail lost in a crash). Not a QEMU write bug;
  QEMU 7.2.22 and 10.0.2 read those clusters as zeros without an error (measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QcowError
from ..file.image import Image
from ..forensics.layout import HostKind, HostLayout, Problem, host_layout
from ..format import constants as C
from .checker import CheckReport

# name -> (title, the writers known to produce it, as measured)
KNOWN = {
    "compressed-into-data-cluster": (
        "compressed data packed into another guest cluster's data cluster (stale compressed packing offset "
        "after a freed cluster was reused)", "QEMU 7.2.22, QEMU 10.0.2 (measured)"),
    "invalid-subcluster-bitmap": (
        "invalid subcluster bitmaps (QEMU fails reads of allocated-and-zero subclusters with EIO; qemu-img check "
        "-r frees a compressed cluster with a bitmap as a leak, losing its data)",
        "no QEMU version known (7.2.22 and 10.0.2 wrote none in random traces)"),
    "data-past-eof": (
        "data clusters past the end of the file (the file was cut short: a truncated copy, or a tail lost in a "
        "crash); QEMU reads them as zeros without an error",
        "not a QEMU write bug (QEMU 7.2.22 and 10.0.2 read them as zeros, measured)"),
}
MAX_EVIDENCE = 8  # evidence lines kept per signature (the counts say how many there are)
BITMAP_KINDS = {"invalid-bitmap-allocated": "allocated and zero at once",
                "invalid-bitmap-unallocated": "allocation bits without a host cluster",
                "compressed-bitmap": "compressed cluster with a non-zero bitmap"}


@dataclass(frozen=True)
class Signature:
    """One recognised pattern in one image."""

    name: str
    title: str
    produced_by: str  # the writers known to produce it, as measured
    count: int  # instances in the image
    evidence: tuple[str, ...]  # the first MAX_EVIDENCE, located
    guest_ranges: tuple[tuple[int, int], ...] = ()  # guest bytes affected (at most) [start, end), first few

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "produced-by": self.produced_by, "count": self.count,
                "evidence": list(self.evidence), "guest-ranges": [{"start": a, "end": b} for a, b in self.guest_ranges]}


def needs_layout(report: CheckReport) -> bool:
    """Whether a layout rule is worth asking: only images check finds damaged pay for the host
    layout (a file cut inside its last cluster, which check cannot see, is not looked for:
    healthy files end inside their last cluster all the time)."""
    return bool(report.corruptions or report.check_errors)


def find_signatures(img: Image, report: CheckReport, layout: HostLayout | None = None) -> tuple[Signature, ...]:
    """Every signature `report` (the check of `img`) and the host layout show."""
    found = [invalid_bitmaps(report, img.header.cluster_size)]
    if layout is None and needs_layout(report):
        layout = host_layout(img, guesses=False)
    if layout is not None:
        found += [compressed_into_data(report, layout), data_past_eof(img, layout)]
    return tuple(s for s in found if s is not None)


def compressed_into_data(report: CheckReport, layout: HostLayout) -> Signature | None:
    """Host clusters owned both as a data cluster and by compressed data (the layout's overlaps)."""
    ov, cs = layout.overlaps, layout.cluster_size
    both = np.intersect1d(ov.cluster[ov.kind == HostKind.DATA], ov.cluster[ov.kind == HostKind.COMPRESSED])
    if not both.size:
        return None
    copied = {f.host_offset: f for f in report.findings if f.kind == "copied-data"}
    evidence, ranges = [], []
    count = 0
    for c in both.tolist():
        h0 = c * cs
        data = [o for o in layout.owners(c) if o.kind == "data"]
        for comp in layout.compressed_in(c):
            for d in data:
                count += 1
                if len(evidence) >= MAX_EVIDENCE:
                    continue
                lo = max(comp.compressed_offset, h0)
                hi = min(comp.compressed_offset + comp.compressed_length, h0 + cs)
                ranges.append((d.guest_offset + lo - h0, d.guest_offset + hi - h0))
                snap = f" (snapshot {d.snapshot})" if d.snapshot is not None else ""
                line = (f"compressed data of guest 0x{comp.guest_offset:x} at host [0x{comp.compressed_offset:x}, "
                        f"+0x{comp.compressed_length:x}) lies in host cluster 0x{h0:x}, the data cluster of guest "
                        f"0x{d.guest_offset:x}{snap}: guest [0x{ranges[-1][0]:x}, 0x{ranges[-1][1]:x}) overwritten "
                        "(at most: the descriptor's range)")
                if h0 in copied:
                    line += f"; check: {copied[h0].message}"
                evidence.append(line)
    return _make("compressed-into-data-cluster", count, evidence, ranges) if count else None


def invalid_bitmaps(report: CheckReport, cluster_size: int) -> Signature | None:
    # an entry of a "table" QEMU walks at offset 0 or unaligned (a broken L1 entry) is not an L2 entry
    found = [f for f in report.findings if f.kind in BITMAP_KINDS and f.l2_offset and not f.l2_offset % cluster_size]
    if not found:
        return None
    sub = cluster_size // 32
    ranges: list[tuple[int, int]] = []
    for f in found[:MAX_EVIDENCE]:
        if f.kind == "compressed-bitmap":
            ranges.append((f.guest_offset, f.guest_offset + cluster_size))
        else:
            ranges += [(f.guest_offset + i * sub, f.guest_offset + (i + 1) * sub) for i in f.subclusters]
    listed = sum(1 for f in report.findings if f.kind in BITMAP_KINDS)
    count = len(found) + sum(n for kind, n in report_counts(report).items() if kind in BITMAP_KINDS) - listed
    return _make("invalid-subcluster-bitmap", count,
                 [f"{BITMAP_KINDS[f.kind]}: {f.place()}" for f in found[:MAX_EVIDENCE]], ranges[:MAX_EVIDENCE])


def report_counts(report: CheckReport) -> dict[str, int]:
    """Findings per kind, those the report left out past its listing limit included."""
    counts: dict[str, int] = {}
    for f in report.findings:
        if f.kind == "truncated":  # "... N more 'KIND' findings not listed"
            kind = f.message.split("'")[1]
            counts[kind] = counts.get(kind, 0) + int(f.message.split()[1])
        else:
            counts[f.kind] = counts.get(f.kind, 0) + 1
    return counts


def data_past_eof(img: Image, layout: HostLayout) -> Signature | None:
    """Data clusters the layout finds past the end of the file, and the file's last cluster when
    the data of the data cluster there (its allocated subclusters) runs past the end."""
    p, cs, size = layout.problems, layout.cluster_size, layout.file_size
    rows = np.flatnonzero((p.problem == Problem.PAST_EOF) & (p.kind == HostKind.DATA))
    cut: list[tuple[int, int, int, int]] = []  # (guest, host, snapshot index or -1, end of its data)
    for j in rows.tolist():
        g, snap = int(p.owner[j]) * cs, int(p.snapshot[j])
        cut.append((g, int(p.offset[j]), snap, _data_end(img, g, cs) if snap < 0 else cs))
    last = layout.nb_clusters - 1
    if size % cs and last >= 0 and layout.cluster_kind(last) == HostKind.DATA:
        for o in layout.owners(last):
            end = _data_end(img, o.guest_offset, cs) if o.snapshot is None else cs
            if last * cs + end > size:
                cut.append((o.guest_offset, last * cs, -1 if o.snapshot is None else 0, end))
    cut = sorted(c for c in cut if c[3])  # zero-only clusters hold no data
    if not cut:
        return None
    evidence, ranges = [], []
    for g, h, snap, end in cut[:MAX_EVIDENCE]:
        kept = min(max(size - h, 0), end)  # bytes of its data still inside the file
        ranges.append((g + kept, g + end))
        evidence.append(f"guest 0x{g:x}{'' if snap < 0 else ' (a snapshot)'}: data at host [0x{h:x}, 0x{h + end:x}) "
                        f"runs past the end of the file (0x{size:x})" + (f"; its first 0x{kept:x} bytes remain"
                                                                         if kept else ""))
    evidence.append(f"the metadata places data up to host 0x{max(h + e for _, h, _, e in cut):x}; the file has "
                    f"0x{size:x} bytes")
    return _make("data-past-eof", len(cut), evidence, ranges)


def _data_end(img: Image, guest: int, cs: int) -> int:
    """Bytes of data in the active data cluster of `guest`, from its start: the end of the last
    allocated, not-zero subcluster (extended L2), the whole cluster unless it reads as zeros
    (standard L2)."""
    try:
        w0, bm, _l2, _i = img.l2_entry(guest // cs)
    except QcowError:
        return cs
    if not img.header.extended_l2:
        return 0 if w0 & C.QCOW_OFLAG_ZERO else cs
    data = (bm & 0xFFFFFFFF) & ~(bm >> 32)
    return data.bit_length() * (cs // 32)


def _make(name: str, count: int, evidence: list[str], ranges: list[tuple[int, int]]) -> Signature:
    title, produced_by = KNOWN[name]
    return Signature(name, title, produced_by, count, tuple(evidence), tuple(ranges))
