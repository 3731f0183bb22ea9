"""The COW plan of a step, drawn like a whiteboard sketch from the engine's `WritePlan`.

Clusters side by side, one column per subcluster; under them the request (write / zero /
discard / compressed), cow_start and cow_end bars coloured by where their bytes come from, and
each cluster's bitmap before -> after with the changed subclusters highlighted. Every position
and label is a field of the plan; nothing here decides what QEMU does.
"""

from __future__ import annotations

from textual.content import Content

from ..engine.write.cost import Cost, StepCost
from ..engine.write.plan import CowPiece, CowSource, RequestKind, WritePlan

SOURCE_STYLE = {CowSource.OLD_CLUSTER: "$qd-data", CowSource.ZEROS: "$text-muted", CowSource.DECOMPRESSED: "$qd-compressed",
                CowSource.BACKING: "$qd-backing", CowSource.BACKING_DECOMPRESSED: "$qd-backing"}
KIND_STYLE = {RequestKind.WRITE: "$qd-data", RequestKind.ZERO: "$qd-zero", RequestKind.ZERO_FALLBACK: "$qd-zero",
              RequestKind.DISCARD: "$qd-warning", RequestKind.COMPRESSED: "$qd-compressed"}
CHAR_STYLE = {"N": "$qd-data", "0": "$qd-zero", "-": "$text-muted", "C": "$qd-compressed", "!": "bold $qd-on-error on $error"}
LABEL = 10


def source_style(piece: CowPiece) -> str:
    return SOURCE_STYLE[piece.source]


def plan_clusters(plan: WritePlan, cluster_size: int) -> list[int]:
    """Guest clusters the plan touches: changed entries and every cluster a request covers."""
    clusters = {c.guest_cluster for c in plan.clusters}
    for r in plan.requests:
        if r.length:
            clusters.update(range(r.guest_offset // cluster_size, (r.guest_offset + r.length - 1) // cluster_size + 1))
        for m in r.metas:
            clusters.update(range(m.guest_offset // cluster_size, m.guest_offset // cluster_size + m.nb_clusters))
    return sorted(clusters)


class Sketch:
    """Character columns for guest offsets within the drawn clusters."""

    def __init__(self, clusters: list[int], cluster_size: int, spc: int):
        self.clusters = clusters
        self.cs = cluster_size
        self.spc = spc
        self.scs = cluster_size // spc
        self.group = 8 if spc == 32 else spc
        self.cwidth = spc + (spc // self.group - 1)  # subclusters and '_' separators

    def col(self, cluster_pos: int, sc: int) -> int:
        return cluster_pos * (self.cwidth + 1) + 1 + sc + sc // self.group

    @property
    def width(self) -> int:
        return len(self.clusters) * (self.cwidth + 1) + 1

    def frame(self) -> list[list]:
        row: list = [(" ", "")] * self.width
        for k in range(len(self.clusters) + 1):
            row[k * (self.cwidth + 1)] = ("│", "$text-muted")
        for k in range(len(self.clusters)):
            for g in range(1, self.spc // self.group):
                row[self.col(k, g * self.group) - 1] = ("_", "$text-muted")
        return row

    def bar(self, start: int, length: int, style: str) -> list:
        """Subclusters covered by [start, start+length): █ when whole, ▒ when partly."""
        row = self.frame()
        end = start + length
        for k, c in enumerate(self.clusters):
            base = c * self.cs
            for sc in range(self.spc):
                a, b = base + sc * self.scs, base + (sc + 1) * self.scs
                if a < end and start < b:
                    row[self.col(k, sc)] = ("█" if start <= a and b <= end else "▒", style)
        return row

    def bitmap(self, strings: dict[int, str], other: dict[int, str] | None) -> list:
        row = self.frame()
        for k, c in enumerate(self.clusters):
            s = strings.get(c, "").replace("_", "")
            o = (other or {}).get(c, "").replace("_", "")
            for sc, ch in enumerate(s[:self.spc]):
                st = CHAR_STYLE.get(ch, "$text")
                if other is not None and o and sc < len(o) and o[sc] != ch:
                    st += " reverse bold"
                row[self.col(k, sc)] = (ch, st)
        return row


def _line(label: str, row: list, label_style: str = "$text-muted") -> Content:
    return Content.assemble((f"{label:<{LABEL}}", label_style), *row)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.3g} {unit}"
    return f"{n} B"


def cost_line(label: str, c: StepCost) -> Content:
    """One line of what a step (or the steps so far) cost: host bytes by kind, COW and its avoidable part."""
    amp = f"  x{c.write_amplification:.2f}" if c.write_amplification is not None else ""
    return Content.assemble(
        (f"{label:<{LABEL}}", "$text-muted"),
        f"guest {_size(c.guest_write_bytes)} -> host data {_size(c.host_data_bytes)}, ",
        ("COW ", "$text-muted"), f"{_size(c.cow_bytes)}",
        (f" ({_size(c.cow_avoidable_bytes)} avoidable)" if c.cow_avoidable_bytes else "", "$error"),
        f", metadata {_size(c.metadata_bytes)}", (amp, "bold"))


class RunningCost:
    """The cost of the steps so far, kept as prefix sums so stepping forward or back is O(1)."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._sums: list[Cost] = []

    def upto(self, records: list) -> StepCost | None:
        """The summed cost of `records` (the session's applied steps, oldest first)."""
        n = len(records)
        keep = min(n, len(self._ids))
        while keep and self._ids[keep - 1] != id(records[keep - 1]):
            keep -= 1  # a step was taken back and another applied in its place
        del self._ids[keep:], self._sums[keep:]
        from ..engine.write.cost import measure

        for rec in records[keep:]:
            total = Cost()
            if self._sums:
                total.add(self._sums[-1])
            if rec.changes_image and rec.trace.geo is not None:
                measure(rec.trace, rec.trace.geo, total)
            self._ids.append(id(rec))
            self._sums.append(total)
        return self._sums[-1].frozen() if self._sums else None


def plan_content(plan: WritePlan | None, cluster_size: int, spc: int, *, title: str = "", max_clusters: int = 4,
                 cost: StepCost | None = None, total: StepCost | None = None) -> Content:
    if plan is None:
        return Content.styled(title or "no plan: read and flush do not write", "$text-muted")
    lines: list[Content] = []
    if title:
        lines.append(Content.styled(title, "$text-muted"))
    lines.append(Content.assemble(("command   ", "$text-muted"), (plan.command, "bold"),
                                  (f"   line {plan.line}" if plan.line else "", "$text-muted")))
    clusters = plan_clusters(plan, cluster_size)
    shown = clusters[:max_clusters]
    if shown:
        sk = Sketch(shown, cluster_size, spc)
        head = [(" ", "")] * sk.width
        for k, c in enumerate(shown):
            label = f" cluster {c} @0x{c * cluster_size:x}"[:sk.cwidth]
            for i, ch in enumerate(label):
                head[k * (sk.cwidth + 1) + 1 + i] = (ch, "bold")
        lines.append(_line("", head))
        before = {c.guest_cluster: c.bitmap_before for c in plan.clusters}
        after = {c.guest_cluster: c.bitmap_after for c in plan.clusters}
        lines.append(_line("before", sk.bitmap(before, None)))
        for r in plan.requests:
            lines.append(_line(r.kind.value, sk.bar(r.guest_offset, r.length, KIND_STYLE[r.kind]), KIND_STYLE[r.kind]))
            for m in r.metas:
                for name, (off, length) in (("cow_start", m.cow_start), ("cow_end", m.cow_end)):
                    if not length:
                        continue
                    start = m.guest_offset + off
                    srcs = [s for s in m.sources if start <= s.guest_offset < start + length] or [None]
                    for s in srcs:
                        if s is None:
                            lines.append(_line(name, sk.bar(start, length, "$text")))
                        else:
                            lines.append(_line(name, sk.bar(s.guest_offset, s.length, source_style(s))
                                               + [(f" {s.label}", source_style(s))]))
                for a in m.avoidable:  # copied although `-` or `0` and untouched: the seed's extra I/O
                    lines.append(_line("avoidable", sk.bar(a.offset, a.length, "$error") + [(" COW not needed", "$error")],
                                       "$error"))
        lines.append(_line("after", sk.bitmap(after, before)))
        if len(clusters) > len(shown):
            lines.append(Content.styled(f"… and {len(clusters) - len(shown)} more clusters", "$text-muted"))
    if cost is not None:
        lines.append(cost_line("cost", cost))
    if total is not None:
        lines.append(cost_line("so far", total))
    for r in plan.requests:
        host = f" -> host 0x{r.host_offset:x}" if r.host_offset is not None else ""
        lines.append(Content.assemble((f"{r.kind.value} ", KIND_STYLE[r.kind]),
                                      f"guest 0x{r.guest_offset:x}+0x{r.length:x}{host}",
                                      (f"  {r.outcome}" if r.outcome else "", "$text-muted")))
        for m in r.metas:
            where = "in place (COPIED)" if m.keep_old else f"new cluster @ host 0x{m.alloc_offset:x}"
            lines.append(Content.assemble(("  L2Meta ", "$text-muted"),
                                          f"guest 0x{m.guest_offset:x} x{m.nb_clusters} {where}",
                                          ("  skip_cow: QEMU zero-fills" if m.skip_cow else "", "$qd-warning")))
            for s in m.sources:
                lines.append(Content.assemble(("    COW ", "$text-muted"), f"0x{s.guest_offset:x}+0x{s.length:x} from ",
                                              (s.label, source_style(s))))
    for a in plan.allocations:
        lines.append(Content.styled(f"allocate {a.what} host 0x{a.offset:x}+0x{a.length:x}", "$text-muted"))
    for f in plan.frees:
        lines.append(Content.styled(f"free host 0x{f.offset:x}+0x{f.length:x}", "$text-muted"))
    for n in plan.notes:
        lines.append(Content.styled(f"note: {n}", "$text-muted"))
    for h in plan.hazards:
        lines.append(Content.styled(f"HAZARD: {h.message}", "bold $qd-error"))
    if plan.error:
        lines.append(Content.styled(f"error: {plan.error}", "bold $qd-error"))
    return Content("\n").join(lines)
