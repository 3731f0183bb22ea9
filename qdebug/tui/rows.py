"""`RowView`: a Line-API list with a cursor, drawing only the visible rows, each Strip cached.

The cluster map (16M rows on a 1 TiB image), the timeline and the hex view share it: the row
count sets `virtual_size`, `render_line` builds or reuses the Strip of one row, and moving the
cursor repaints two lines, not the widget. A row wider than the view is never cut silently: the
last visible cell becomes `…` (and the first one when scrolled right), so a cut number shows it is
cut. Component styles are resolved against the widget's real background (theme colours such as
`$text-muted` are "auto 60%": without a background they come out near-white on a light theme).
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip


class RowView(ScrollView, inherit_bindings=False, can_focus=True):
    """Subclasses implement `render_row(index, cursor) -> Strip` and set `row_count`."""

    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False, id="rows.up"),
        Binding("down,j", "cursor(1)", "Down", show=False, id="rows.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="rows.page_up"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="rows.page_down"),
        Binding("home", "edge(0)", "First", show=False, id="rows.home"),
        Binding("end", "edge(1)", "Last", show=False, id="rows.end"),
    ]

    class CursorMoved(Message):
        def __init__(self, view: "RowView", index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

        @property
        def control(self) -> "RowView":
            return self.view

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None):
        super().__init__(name=name, id=id, classes=classes)
        self.row_count = 0
        self.cursor = 0
        self.row_width = 80
        self.version = 0
        self._strips: LRUCache[tuple, Strip] = LRUCache(maxsize=1024)
        self._styles: dict[str, Style] = {}

    # ---- styles --------------------------------------------------------------------------
    def style_of(self, name: str) -> Style:
        """The component class `name` as a Rich style: only what the class sets (a colour, a
        background, bold...), with colours blended onto the background they are drawn on."""
        st = self._styles.get(name)
        if st is None:
            rules = self.get_component_styles(name)
            full = self.get_visual_style(name).rich_style
            st = Style(color=full.color if rules.has_rule("color") else None,
                       bgcolor=full.bgcolor if rules.has_rule("background") else None) + rules.text_style
            self._styles[name] = st
        return st

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles.clear()
        self._strips.clear()

    # ---- content -------------------------------------------------------------------------
    def set_rows(self, count: int, width: int | None = None, *, keep_cursor: bool = True) -> None:
        self.row_count = count
        if width is not None:
            self.row_width = width
        self.version += 1
        self._strips.clear()
        self.cursor = min(self.cursor, max(0, count - 1)) if keep_cursor else 0
        self.virtual_size = Size(self.row_width, count)
        self.refresh()

    def changed(self) -> None:
        """The data behind the rows changed: redraw everything visible."""
        self.version += 1
        self._strips.clear()
        self.refresh()

    def row_key(self, index: int) -> tuple:
        """Extra cache key parts of a row (override when a row depends on more state)."""
        return ()

    def render_row(self, index: int, cursor: bool) -> Strip:
        raise NotImplementedError

    def base_style(self) -> Style:
        st = self._styles.get("__base__")
        if st is None:
            st = self._styles["__base__"] = self.rich_style
        return st

    def render_line(self, y: int) -> Strip:
        index = self.scroll_offset.y + y
        width = self.scrollable_content_region.width
        base = self.base_style()
        if index >= self.row_count:
            return Strip.blank(width, base)
        cur = index == self.cursor
        key = (index, self.version, cur, width) + self.row_key(index)
        strip = self._strips.get(key)
        if strip is None:
            strip = self.render_row(index, cur).apply_style(base)
            self._strips[key] = strip
        x = self.scroll_offset.x
        line = strip.crop_extend(x, x + width, base + self.cursor_style() if cur else base)
        right = strip.cell_length > x + width and bool(strip.crop(x + width).text.strip())
        left = x > 0 and bool(strip.crop(0, x + 1).text.strip())
        return mark_cut(line, left=left, right=right) if left or right else line

    def cursor_style(self) -> Style:
        """Background of the cursor row past its text (override with the widget's cursor class)."""
        return Style()

    def on_resize(self) -> None:
        """The selection stays on screen when the terminal (or the panel) changes size."""
        self.call_after_refresh(self.show_cursor)

    def show_cursor(self) -> None:
        if self.row_count:
            self.scroll_to_region(Region(0, self.cursor, 1, 1), animate=False, force=True)

    # ---- cursor --------------------------------------------------------------------------
    def move_to(self, index: int, *, center: bool = False) -> None:
        if not self.row_count:
            return
        index = max(0, min(self.row_count - 1, index))
        old = self.cursor
        self.cursor = index
        self.refresh_line(old)
        self.refresh_line(index)
        self.scroll_to_region(Region(0, index, 1, 1), animate=False, center=center, force=True)
        if old != index or center:
            self.post_message(self.CursorMoved(self, index))

    def action_cursor(self, delta: int) -> None:
        self.move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        page = max(1, self.scrollable_content_region.height - 1)
        self.scroll_to(y=self.scroll_offset.y + direction * page, animate=False, force=True, immediate=True)
        self.move_to(self.cursor + direction * page)

    def action_scroll_x(self, delta: int) -> None:
        """Scroll sideways (rows wider than the view end in `…`)."""
        self.scroll_to(x=max(0, self.scroll_offset.x + delta), animate=False, force=True)

    def action_edge(self, end: int) -> None:
        self.move_to(self.row_count - 1 if end else 0)

    def on_click(self, event: events.Click) -> None:
        off = event.get_content_offset(self)
        if off is None:
            return
        self.focus()
        self.row_clicked(self.scroll_offset.y + off.y, self.scroll_offset.x + off.x)

    def row_clicked(self, index: int, x: int) -> None:
        if index < self.row_count:
            self.move_to(index)


def mark_cut(line: Strip, *, left: bool, right: bool) -> Strip:
    """`…` in the first / last cell of a line whose row goes on past the view's edge."""
    width = line.cell_length
    if width < 2:
        return line
    segs = list(line)
    out = Strip(segs, width)
    if right:
        head = out.crop(0, width - 1)
        style = segs[-1].style if segs else None
        out = Strip([*head, Segment("…", style)], width)
    if left:
        tail = out.crop(1, width)
        style = segs[0].style if segs else None
        out = Strip([Segment("…", style), *tail], width)
    return out


def segments(parts: list[tuple[str, Style]]) -> list[Segment]:
    """Join neighbouring parts of one style into a segment each."""
    out: list[Segment] = []
    for text, style in parts:
        if out and out[-1].style == style:
            out[-1] = Segment(out[-1].text + text, style)
        else:
            out.append(Segment(text, style))
    return out
