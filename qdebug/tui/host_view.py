"""The host view: one row per host cluster of the image file, coloured by what owns it (the engine's
`HostLayout`: metadata, guest data, compressed, free, leaked, overlaps), problems highlighted.

Not yet wired into the app (the `h` toggle and Enter-jump come with the TUI's threading rework);
it is a self-contained RowView over a layout, drawing only the visible rows. `guest_clusters(n)`
gives the guest clusters the selected host cluster holds, for the jump to the guest view.
"""

from __future__ import annotations

import numpy as np
from rich.style import Style
from textual.strip import Strip

from ..engine.forensics.layout import KIND_NAMES, HostKind, HostLayout
from .rows import RowView, segments

_CLASS = {k: f"hostview--{name}" for k, name in enumerate(KIND_NAMES)}


class HostView(RowView):
    """Cursor = selected host cluster."""

    COMPONENT_CLASSES = {"hostview--offset", "hostview--owner", "hostview--cursor", *_CLASS.values()}
    DEFAULT_CSS = """
    HostView {
        & > .hostview--offset { color: $text-muted; }
        & > .hostview--owner { color: $text-muted; }
        & > .hostview--cursor { background: $boost; }
        & > .hostview--header, & > .hostview--l1, & > .hostview--l2 { color: $accent; }
        & > .hostview--refcount-table, & > .hostview--refcount-block { color: $secondary; }
        & > .hostview--snapshot-table, & > .hostview--bitmap-directory, & > .hostview--bitmap-table,
        & > .hostview--bitmap-data { color: $secondary; }
        & > .hostview--data { color: $success; }
        & > .hostview--compressed { color: #c678dd; }
        & > .hostview--free { color: $text-disabled; }
        & > .hostview--leaked { color: $warning; text-style: bold; }
        & > .hostview--overlap { color: $text; background: $error; text-style: bold; }
    }
    """

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
                 (f"{KIND_NAMES[kind]:<17}", self.style_of(_CLASS[kind]) + cur),
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
