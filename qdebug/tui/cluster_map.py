"""The cluster map: one row per guest cluster, its subcluster bitmap string coloured by type.

Rows come from `ImageModel.block` (numpy arrays for 256 clusters at a time), so only the visible
rows of a 16M-row map are ever built. The character is the engine's bitmap string (`N 0 - C !`);
the colour says which layer answers a read of that subcluster (this image, a backing file, zeros).
"""

from __future__ import annotations

import numpy as np
from rich.style import Style
from textual.binding import Binding
from textual.message import Message
from textual.strip import Strip

from ..engine.format.subclusters import TYPE_CHARS
from ..engine.format.subclusters import SubclusterType as T
from .model import READS_DATA, READS_INVALID, ImageModel
from .rows import RowView, segments


class ClusterMap(RowView):
    """Cursor = selected guest cluster; left/right select the subcluster inside it."""

    COMPONENT_CLASSES = {
        "clustermap--offset", "clustermap--index", "clustermap--normal", "clustermap--zero",
        "clustermap--compressed", "clustermap--invalid", "clustermap--unalloc", "clustermap--backing",
        "clustermap--backing-zero", "clustermap--cursor", "clustermap--selected", "clustermap--src",
        "clustermap--shared",
    }
    BINDINGS = [
        Binding("left", "subcluster(-1)", "Prev subcluster", show=False, id="map.sc_left"),
        Binding("right", "subcluster(1)", "Next subcluster", show=False, id="map.sc_right"),
        Binding("enter", "app.to_host", "Its host cluster (host view)", show=False, id="map.to_host"),
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
        self._block_cache: dict = {}
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

    CODE_CLASSES = ("clustermap--normal", "clustermap--compressed", "clustermap--zero", "clustermap--invalid",
                    "clustermap--backing", "clustermap--backing-zero", "clustermap--unalloc")

    def _codes(self, blk) -> list[list[int]]:
        """Per-subcluster colour codes (index into CODE_CLASSES) of a whole block, computed once."""
        key = ("codes", blk.first, self.model.version)
        codes = self._block_cache.get(key)
        if codes is None:
            t, r, d = blk.types, blk.reads, blk.depth
            unalloc = np.where(d > 0, np.where(r == READS_DATA, 4, 5), 6)
            c = np.where(t == T.NORMAL, 0, np.where(t == T.COMPRESSED, 1, np.where(
                (t == T.ZERO_PLAIN) | (t == T.ZERO_ALLOC), 2, unalloc)))
            c = np.where((t == T.INVALID) | (r == READS_INVALID), 3, c)
            if len(self._block_cache) > 16:
                self._block_cache.clear()
            codes = self._block_cache[key] = c.astype(np.uint8).tolist()
        return codes

    def _palette(self, cursor: bool) -> list[Style]:
        """Styles of the codes, then offset/index/src/separator, with the cursor background composed in."""
        key = ("palette", cursor)
        pal = self._styles.get(key)
        if pal is None:
            cur = self.style_of("clustermap--cursor") if cursor else Style()
            names = self.CODE_CLASSES + ("clustermap--offset", "clustermap--index", "clustermap--src")
            pal = self._styles[key] = [cur + self.style_of(n) for n in names]  # an own background (invalid) stays
        return pal

    def render_row(self, index: int, cursor: bool) -> Strip:
        m = self.model
        blk, i = m.row(index)
        codes = self._codes(blk)[i]
        chars = [TYPE_CHARS[t] for t in blk.types[i].tolist()]
        pal = self._palette(cursor)
        off_st, idx_st, src_st = pal[-3], pal[-2], pal[-1]
        shared = bool(blk.shared[i])  # allocated without COPIED: shared with a snapshot, a write copies it
        parts: list[tuple[str, Style]] = [
            ("s " if shared else "  ", self.style_of("clustermap--shared") + (self.cursor_style() if cursor else Style())),
            (f"0x{index * m.cluster_size:0{self.offset_digits}x}  ", off_st),
            (f"{index:>{self.index_digits}}  ", idx_st)]
        spc = len(codes)
        sel = self.subcluster if cursor else -1
        run, run_code = "", -1
        for sc in range(spc):
            code = codes[sc]
            if spc == 32 and sc and sc % 8 == 0:
                if code == run_code and sc != sel and sc - 1 != sel:
                    run += "_"
                else:
                    if run:
                        parts.append((run, pal[run_code]))
                    parts.append(("_", off_st))
                    run, run_code = "", -1
            if sc == sel:
                if run:
                    parts.append((run, pal[run_code]))
                parts.append((chars[sc], pal[code] + self.style_of("clustermap--selected")))
                run, run_code = "", -1
            elif code == run_code:
                run += chars[sc]
            else:
                if run:
                    parts.append((run, pal[run_code]))
                run, run_code = chars[sc], code
        if run:
            parts.append((run, pal[run_code]))
        depth, reads = blk.depth[i], blk.reads[i]
        srcs = np.unique(depth[reads == READS_DATA]).tolist()
        src = "+".join(str(d) for d in srcs) if srcs else "·"
        parts.append((f"  {src:<5}", src_st))
        return Strip(segments(parts))

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
