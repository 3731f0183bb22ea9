"""The host view: one row per host cluster of the image file, coloured by what owns it (the engine's
`HostLayout`: metadata, guest data, compressed, free, leaked, overlaps), problems highlighted.

A RowView over a layout (computed by an engine job: `host_layout` reads the whole file), drawing
only the visible rows; `h` in the app swaps it with the cluster map. `guest_clusters(n)` gives the
guest clusters the selected host cluster holds, where Enter jumps in the guest view.
"""

from __future__ import annotations

import numpy as np
from rich.style import Style
from textual.binding import Binding
from textual.strip import Strip

from ..engine.forensics.layout import KIND_NAMES, HostKind, HostLayout
from .rows import RowView, segments

_CLASS = {k: f"hostview--{name}" for k, name in enumerate(KIND_NAMES)}


class HostView(RowView):
    """Cursor = selected host cluster."""

    COMPONENT_CLASSES = {"hostview--offset", "hostview--owner", "hostview--cursor", *_CLASS.values()}
    BINDINGS = [Binding("enter", "app.to_owner", "Its owner (guest view)", show=False, id="host.to_owner")]

    def __init__(self, layout: HostLayout | None = None, **kw):
        super().__init__(**kw)
        self.host_layout = layout
        if layout is not None:
            self.set_layout(layout)

    def set_layout(self, layout: HostLayout) -> None:
        self.host_layout = layout
        self.offset_digits = len(f"{max(1, layout.file_size - 1):x}")
        self.set_rows(layout.nb_clusters, 4 + self.offset_digits + 2 + 17 + 60)

    def cursor_style(self) -> Style:
        return self.style_of("hostview--cursor")

    def row_key(self, index: int) -> tuple:
        return (id(self.host_layout),)

    def describe(self, index: int) -> str:
        """Who owns host cluster `index`, in words (the content guess for unreferenced ones)."""
        lay = self.host_layout
        owners = lay.owners(index)
        if owners:
            text = " and ".join(o.describe() for o in owners[:3])
            return text + (f" (+{len(owners) - 3} more)" if len(owners) > 3 else "")
        guess = lay.guess_of(index)
        return f"looks like {guess}" if guess else ""

    def render_row(self, index: int, cursor: bool) -> Strip:
        lay = self.host_layout
        kind = lay.cluster_kind(index)
        cur = self.cursor_style() if cursor else Style()
        parts = [(f"  0x{index * lay.cluster_size:0{self.offset_digits}x}  ", self.style_of("hostview--offset") + cur),
                 (f"{KIND_NAMES[kind]:<17}", cur + self.style_of(_CLASS[kind])),  # a problem keeps its red
                 (self.describe(index), self.style_of("hostview--owner") + cur)]
        return Strip(segments(parts))

    def guest_clusters(self, index: int) -> list[int]:
        """Guest clusters of the active image whose data (or compressed stream) lies in host cluster
        `index`: where Enter jumps in the guest view."""
        cs = self.host_layout.cluster_size
        return sorted({o.guest_offset // cs for o in self.host_layout.owners(index)
                       if o.guest_offset is not None and o.snapshot is None})

    def next_problem(self, index: int) -> int | None:
        """The first host cluster after `index` that is overlapped or leaked."""
        r = self.host_layout.runs
        hit = np.flatnonzero(np.isin(r.kind, (HostKind.OVERLAP, HostKind.LEAKED)) & (r.start + r.count - 1 > index))
        return max(index + 1, int(r.start[hit[0]])) if len(hit) else None
