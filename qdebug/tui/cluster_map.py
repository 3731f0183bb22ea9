"""The cluster map: one row per guest cluster, its subcluster bitmap string coloured by type.

Rows come from `ImageModel.block` (numpy arrays for 256 clusters at a time), so only the visible
rows of a 16M-row map are ever built. The character is the engine's bitmap string (`N 0 - C !`);
the colour says which layer answers a read of that subcluster (this image, a backing file, zeros).
"""

from __future__ import annotations

from rich.style import Style
from textual.binding import Binding
from textual.message import Message
from textual.strip import Strip

from ..engine.subclusters import TYPE_CHARS, SubclusterType as T
from .model import READS_DATA, READS_INVALID, ImageModel
from .rows import RowView, segments


class ClusterMap(RowView):
    """Cursor = selected guest cluster; left/right select the subcluster inside it."""

    COMPONENT_CLASSES = {
        "clustermap--offset", "clustermap--index", "clustermap--normal", "clustermap--zero",
        "clustermap--compressed", "clustermap--invalid", "clustermap--unalloc", "clustermap--backing",
        "clustermap--backing-zero", "clustermap--cursor", "clustermap--selected", "clustermap--src",
    }
    BINDINGS = [
        Binding("left,h", "subcluster(-1)", "Prev subcluster", show=False, id="map.sc_left"),
        Binding("right,l", "subcluster(1)", "Next subcluster", show=False, id="map.sc_right"),
    ]

    class SubclusterSelected(Message):
        def __init__(self, cluster: int, subcluster: int) -> None:
            super().__init__()
            self.cluster = cluster
            self.subcluster = subcluster

    def __init__(self, model: ImageModel | None = None, **kw):
        super().__init__(**kw)
        self.model = model
        self.subcluster = 0
        if model is not None:
            self.set_model(model)

    def set_model(self, model: ImageModel) -> None:
        self.model = model
        self.offset_digits = len(f"{max(1, model.chain.size - 1):x}")
        self.index_digits = len(str(max(1, model.nclusters - 1)))
        self.subcluster = min(self.subcluster, model.spc - 1)
        self.set_rows(model.nclusters, self._row_width())

    def row_width_needed(self) -> int:
        return self._row_width() + 1  # + the vertical scrollbar

    def _row_width(self) -> int:
        spc = self.model.spc
        bits = spc + (spc // 8 - 1 if spc == 32 else 0)
        return 4 + self.offset_digits + 2 + self.index_digits + 2 + bits + 2 + 5

    def sync(self) -> None:
        """The model's version moved (step, undo, repair): rebuild the visible rows."""
        if self.model is not None and self.row_count != self.model.nclusters:
            self.set_model(self.model)
        else:
            self.changed()

    def cursor_style(self) -> Style:
        return self.style_of("clustermap--cursor")

    def row_key(self, index: int) -> tuple:
        return (self.model.version, self.subcluster if index == self.cursor else -1)

    def render_row(self, index: int, cursor: bool) -> Strip:
        m = self.model
        blk, i = m.row(index)
        types, reads, depth = blk.types[i], blk.reads[i], blk.depth[i]
        cur = self.style_of("clustermap--cursor") if cursor else Style()
        sel = self.style_of("clustermap--selected")
        off = self.style_of("clustermap--offset") + cur
        parts: list[tuple[str, Style]] = [
            (f"  0x{index * m.cluster_size:0{self.offset_digits}x}  ", off),
            (f"{index:>{self.index_digits}}  ", self.style_of("clustermap--index") + cur),
        ]
        spc = len(types)
        for sc in range(spc):
            if spc == 32 and sc and sc % 8 == 0:
                parts.append(("_", off))
            style = self._sc_style(int(types[sc]), int(reads[sc]), int(depth[sc])) + cur
            if cursor and sc == self.subcluster:
                style = style + sel
            parts.append((TYPE_CHARS[int(types[sc])], style))
        srcs = sorted({int(d) for d, r in zip(depth.tolist(), reads.tolist()) if r == READS_DATA})
        src = "+".join(f"{d}" for d in srcs) if srcs else "·"
        parts.append((f"  {src:<5}", self.style_of("clustermap--src") + cur))
        return Strip(segments(parts))

    def _sc_style(self, t: int, reads: int, depth: int) -> Style:
        if t == T.INVALID or reads == READS_INVALID:
            return self.style_of("clustermap--invalid")
        if t == T.NORMAL:
            return self.style_of("clustermap--normal")
        if t == T.COMPRESSED:
            return self.style_of("clustermap--compressed")
        if t in (T.ZERO_PLAIN, T.ZERO_ALLOC):
            return self.style_of("clustermap--zero")
        if depth > 0:
            return self.style_of("clustermap--backing" if reads == READS_DATA else "clustermap--backing-zero")
        return self.style_of("clustermap--unalloc")

    # ---- selection -----------------------------------------------------------------------
    def select(self, cluster: int, subcluster: int | None = None) -> None:
        if subcluster is not None:
            self.subcluster = max(0, min(self.model.spc - 1, subcluster))
        moved = cluster != self.cursor
        self.move_to(cluster, center=True)
        if not moved:
            self.refresh_line(cluster)
            self.post_message(self.SubclusterSelected(self.cursor, self.subcluster))

    def action_subcluster(self, delta: int) -> None:
        spc = self.model.spc
        sc = self.subcluster + delta
        cluster = self.cursor
        if sc < 0 and cluster > 0:
            cluster, sc = cluster - 1, spc - 1
        elif sc >= spc and cluster < self.row_count - 1:
            cluster, sc = cluster + 1, 0
        self.subcluster = max(0, min(spc - 1, sc))
        if cluster != self.cursor:
            self.move_to(cluster)
        else:
            self.refresh_line(cluster)
            self.post_message(self.SubclusterSelected(self.cursor, self.subcluster))

    def row_clicked(self, index: int, x: int) -> None:
        if index >= self.row_count:
            return
        first = 2 + 2 + self.offset_digits + 2 + self.index_digits + 2
        col = x - first
        spc = self.model.spc
        if 0 <= col < self._row_width():
            sc = col - col // 9 if spc == 32 else col
            if spc == 32 and col % 9 == 8:
                sc = None
            if sc is not None and 0 <= sc < spc:
                self.subcluster = sc
        if index != self.cursor:
            self.move_to(index)
        else:
            self.refresh_line(index)
            self.post_message(self.SubclusterSelected(self.cursor, self.subcluster))

    def on_row_view_cursor_moved(self, event: RowView.CursorMoved) -> None:
        if event.view is self:
            event.stop()
            self.post_message(self.SubclusterSelected(event.index, self.subcluster))
