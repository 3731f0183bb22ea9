"""L2 inspector: the selected cluster's L1/L2 entry decoded, and the selected subcluster's bytes.

Everything shown is an engine value (`ImageModel.entry` / `subcluster_bytes`); this module only
lays it out.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Static

from ..engine.format.subclusters import TYPE_CHARS
from ..engine.format.subclusters import SubclusterType as T
from .hex_view import HexView
from .model import READS_DATA, READS_INVALID, EntryInfo, ImageModel

TYPE_STYLE = {T.NORMAL: "$qd-data", T.COMPRESSED: "$qd-compressed", T.ZERO_PLAIN: "$qd-zero", T.ZERO_ALLOC: "$qd-zero",
              T.INVALID: "bold $qd-on-error on $error", T.UNALLOCATED_PLAIN: "$text-muted",
              T.UNALLOCATED_ALLOC: "$text-muted"}
BACKING_STYLE = "$qd-backing"
SOURCE_LINES = 2
MAX_RUNS = 4  # type-run lines in the entry panel (its height is fixed: no relayout per cursor move)


def sc_style(t: int, reads: int, depth: int) -> str:
    if t in (T.UNALLOCATED_PLAIN, T.UNALLOCATED_ALLOC) and depth > 0 and reads == READS_DATA:
        return BACKING_STYLE
    if reads == READS_INVALID:
        return TYPE_STYLE[T.INVALID]
    return TYPE_STYLE[T(t)]


def bitmap_content(info: EntryInfo, selected: int | None = None) -> Content:
    parts: list = []
    n = len(info.types)
    for sc in range(n):
        if n == 32 and sc and sc % 8 == 0:
            parts.append("_")
        st = sc_style(info.types[sc], info.reads[sc], info.depth[sc])
        if sc == selected:
            st += " reverse"
        parts.append((TYPE_CHARS[info.types[sc]], st))
    return Content.assemble(*parts)


def type_runs(info: EntryInfo) -> list[tuple[int, int, int, int, int]]:
    """(first, last, type, depth, reads) runs of subclusters that read alike."""
    runs: list[list[int]] = []
    for sc, key in enumerate(zip(info.types, info.depth, info.reads)):
        if runs and tuple(runs[-1][2:]) == key:
            runs[-1][1] = sc
        else:
            runs.append([sc, sc, *key])
    return [tuple(r) for r in runs]  # type: ignore[misc]


def entry_content(info: EntryInfo, selected: int) -> Content:
    hx = lambda v: f"0x{v:016x}"  # noqa: E731
    lines: list[Content] = []
    lines.append(Content.assemble(("cluster ", "$text-muted"), (f"{info.cluster}", "bold"),
                                  ("  guest ", "$text-muted"), f"0x{info.guest_offset:x}",
                                  ("  L1[", "$text-muted"), f"{info.l1_index}", ("] ", "$text-muted"),
                                  hx(info.l1_entry)))
    lines.append(Content.assemble(("L2 table ", "$text-muted"), f"0x{info.l2_offset:x}" if info.l2_offset else "none",
                                  ("  L2[", "$text-muted"), f"{info.l2_index}", ("]", "$text-muted")))
    lines.append(Content.assemble(("entry  ", "$text-muted"), (hx(info.word0), "bold"),
                                  ("  COPIED" if info.copied else "", "$qd-data"),
                                  ("  COMPRESSED" if info.compressed else "", "$qd-compressed")))
    if info.extended:
        lines.append(Content.assemble(("bitmap ", "$text-muted"), (hx(info.bitmap), "bold"),
                                      ("  zero|alloc", "$text-muted")))
    if info.host_offset is not None:
        what = f"  {info.compressed_bytes} bytes compressed" if info.compressed else ""
        rc = "?" if info.refcount is None else str(info.refcount)
        past = (f"  past the end of the file (0x{info.file_size:x}): reads as zeros", "bold $qd-on-error on $error") \
            if info.host_past_eof else ""
        lines.append(Content.assemble(("host   ", "$text-muted"), f"0x{info.host_offset:x}{what}",
                                      ("  refcount ", "$text-muted"), (rc, "bold"), past))
    else:
        lines.append(Content.styled("host   none (no cluster allocated in this image)", "$text-muted"))
    lines.append(Content.assemble(("subclusters ", "$text-muted"), bitmap_content(info, selected)))
    runs = type_runs(info)
    if len(runs) > MAX_RUNS:
        runs = runs[:MAX_RUNS - 1]
        more = True
    else:
        more = False
    for first, last, t, depth, reads in runs:
        rng = f"{first}" if first == last else f"{first}-{last}"
        name = T(t).name
        if reads == READS_INVALID:
            tail = "EIO on read"
        elif reads == READS_DATA:
            tail = "data from this image" if depth == 0 else f"data from backing depth {depth}"
        else:
            tail = "reads zeros" if depth == 0 else f"zeros from backing depth {depth}"
        lines.append(Content.assemble(f"  {rng:>5} ", (f"{name:<18}", sc_style(t, reads, depth)),
                                      (tail, "$text-muted")))
    if more:
        lines.append(Content.styled("  … more runs: see the bitmap above", "$text-muted"))
    if info.error:
        lines.append(Content.styled(info.error, "$qd-error"))
    return Content("\n").join(lines)


def host_content(layout, index: int, guest: list[int]) -> Content:
    """One host cluster of the host view: its kind, every owner, the content guess, its problems."""
    cs = layout.cluster_size
    kind = layout.kind_of(index)
    owners = layout.owners(index)
    lines = [Content.assemble(("host cluster ", "$text-muted"), (f"{index}", "bold"), ("  @ ", "$text-muted"),
                              f"0x{index * cs:x}", ("  kind ", "$text-muted"),
                              (kind, "bold $qd-error" if kind in ("overlap", "leaked") else "bold"))]
    for o in owners[:MAX_RUNS + 2]:
        lines.append(Content.assemble(("  owner ", "$text-muted"), o.describe()))
    if len(owners) > MAX_RUNS + 2:
        lines.append(Content.styled(f"  … and {len(owners) - MAX_RUNS - 2} more owners", "$text-muted"))
    guess = layout.guess_of(index)
    if guess:
        lines.append(Content.assemble(("  content looks like ", "$text-muted"), guess))
    if kind == "overlap":
        lines.append(Content.styled("  two structures claim this cluster: writing one corrupts the other", "$qd-error"))
    elif kind == "leaked":
        lines.append(Content.styled("  refcount > 0 but nothing references it (check -r leaks frees it)",
                                    "$qd-warning"))
    if guest:
        where = ", ".join(str(c) for c in guest[:8]) + (" …" if len(guest) > 8 else "")
        lines.append(Content.assemble(("Enter: ", "bold $text-accent"), f"guest cluster{'s' if len(guest) > 1 else ''} "
                                      f"{where} (Enter there comes back)"))
    return Content("\n").join(lines)


class Inspector(Vertical):
    """Entry details above, the selected subcluster's bytes below."""

    def compose(self) -> ComposeResult:
        yield Static(id="entry")
        yield Static(id="sources")
        yield HexView(id="hex")

    def show_host(self, layout, index: int, guest: list[int]) -> None:
        """The host view's selection: what owns host cluster `index` (no bytes shown)."""
        self.border_title = f"host cluster {index}"
        self.query_one("#entry", Static).update(host_content(layout, index, guest), layout=False)
        self.query_one("#sources", Static).update("", layout=False)
        self.query_one(HexView).show(0, b"")

    def show(self, model: ImageModel, cluster: int, subcluster: int) -> None:
        info = model.entry(cluster)
        self.border_title = f"L2 entry of cluster {cluster}"
        self.query_one("#entry", Static).update(entry_content(info, subcluster), layout=False)
        try:
            sb = model.subcluster_bytes(cluster, subcluster)
        except Exception as e:  # noqa: BLE001 - a broken image must not take the inspector down
            self.query_one("#sources", Static).update(Content.styled(f"cannot read: {e}", "$qd-error"), layout=False)
            self.query_one(HexView).show(0, b"")
            return
        src_lines = [Content.assemble((f"subcluster {subcluster}", "bold"),
                                      f" @ 0x{sb.offset:x} ({len(sb.data)} bytes)")]
        for s in sb.sources:
            st = "$qd-error" if s.reads == READS_INVALID else "$text-muted" if s.reads != READS_DATA else \
                BACKING_STYLE if s.depth else "$qd-data"
            src_lines.append(Content.assemble(f"  0x{s.start:x}-0x{s.end:x} ", (s.label, st)))
        self.query_one("#sources", Static).update(Content("\n").join(src_lines[:SOURCE_LINES]), layout=False)
        self.query_one(HexView).show(sb.offset, sb.data, sb.sources)
