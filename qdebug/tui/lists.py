"""Row lists beside the map: the trace timeline and the check findings (both Line-API views)."""

from __future__ import annotations

from rich.style import Style
from textual.binding import Binding
from textual.message import Message
from textual.strip import Strip

from .rows import RowView, segments


class Timeline(RowView):
    """Trace lines: step k (1-based) is applied when k <= position. Clicking a step seeks to it.

    Rows are `TraceLine`s: the session's commands first (row k is step k + 1), then from the first
    line that cannot be replayed on, lines that are listed but never run. A failed step and a line
    that cannot be replayed are marked ✗; `reason(row)` says why (the app shows it on selection).
    """

    COMPONENT_CLASSES = {"timeline--applied", "timeline--pending", "timeline--current", "timeline--cursor",
                         "timeline--error", "timeline--number", "timeline--blocked"}
    BINDINGS = [
        Binding("left", "scroll_x(-8)", "Scroll left", show=False, id="trace.scroll_left"),
        Binding("right", "scroll_x(8)", "Scroll right", show=False, id="trace.scroll_right"),
    ]

    class SeekRequested(Message):
        def __init__(self, position: int) -> None:
            super().__init__()
            self.position = position

    def __init__(self, **kw):
        super().__init__(**kw)
        self.lines: list = []
        self.steps = 0  # rows that are steps of the session
        self.position = 0
        self.errors: dict[int, str] = {}

    def set_trace(self, lines: list, steps: int, position: int = 0) -> None:
        self.lines = lines
        self.steps = steps
        self.position = position
        width = max([len(t.text) for t in lines] + [20]) + 14
        self.set_rows(len(lines), width)
        self.move_to(max(0, position - 1))
        self._subtitle()

    def set_position(self, position: int, errors: dict[int, str] | None = None) -> None:
        self.position = position
        if errors is not None:
            self.errors = errors
        self.changed()
        self.move_to(max(0, position - 1))
        self._subtitle()

    def _subtitle(self) -> None:
        blocked = len(self.lines) - self.steps
        self.border_subtitle = (f"step {self.position} of {self.steps}" + (f", {blocked} not run" if blocked else "")
                                if self.lines else "")

    def reason(self, index: int) -> str | None:
        """Why row `index` failed or cannot run (None: it did not fail)."""
        if not 0 <= index < len(self.lines):
            return None
        t = self.lines[index]
        if t.problem:
            return f"line {t.lineno} cannot be replayed: {t.problem}"
        if index >= self.steps:
            return f"line {t.lineno} is not run: a line before it cannot be replayed"
        if index in self.errors:
            return f"step {index + 1} failed: {self.errors[index]}"
        return None

    def cursor_style(self) -> Style:
        if self.cursor == self.position - 1:
            return self.style_of("timeline--applied") + self.style_of("timeline--current")
        return self.style_of("timeline--cursor")

    def row_key(self, index: int) -> tuple:
        return (self.position, index in self.errors)

    def render_row(self, index: int, cursor: bool) -> Strip:
        t = self.lines[index]
        step = index + 1
        runnable = index < self.steps
        applied = runnable and step <= self.position
        current = runnable and step == self.position
        failed = index in self.errors or t.problem is not None
        base = self.style_of("timeline--applied" if applied else "timeline--pending")
        if not runnable:
            base = self.style_of("timeline--blocked")
        if failed:
            base = self.style_of("timeline--error")
        if current:
            base = base + self.style_of("timeline--current")
        elif cursor:
            base = base + self.style_of("timeline--cursor")
        mark = "✗" if failed and (applied or not runnable) else "▶" if current else "✓" if applied else " "
        number = f"{step:>4}" if runnable else "   -"
        where = f"  :{t.lineno}" if t.lineno else ""
        return Strip(segments([(f"{mark}{number} ", base), (t.text, base),
                               (where, base + self.style_of("timeline--number"))]))

    def row_clicked(self, index: int, x: int) -> None:
        if index < self.row_count:
            self.move_to(index)
            self.post_message(self.SeekRequested(min(index + 1, self.steps)))


class FindingsView(RowView):
    """`check` findings, most severe first; selecting one moves the map to its guest offset."""

    COMPONENT_CLASSES = {"findings--error", "findings--leak", "findings--info", "findings--cursor",
                         "findings--place"}
    BINDINGS = [
        Binding("left", "scroll_x(-8)", "Scroll left", show=False, id="findings.scroll_left"),
        Binding("right", "scroll_x(8)", "Scroll right", show=False, id="findings.scroll_right"),
    ]

    class FindingSelected(Message):
        def __init__(self, finding) -> None:
            super().__init__()
            self.finding = finding

    def __init__(self, **kw):
        super().__init__(**kw)
        self.findings: list = []

    def set_findings(self, findings) -> None:
        order = {"error": 0, "leak": 1, "info": 2}  # (a Severity hashes by its name: key on the value)
        self.findings = sorted(findings, key=lambda f: order.get(f.severity.value, 3))
        self.set_rows(len(self.findings), max([len(f.message) + len(f.place()) for f in self.findings] + [20]) + 12,
                      keep_cursor=False)

    def cursor_style(self) -> Style:
        return self.style_of("findings--cursor")

    def render_row(self, index: int, cursor: bool) -> Strip:
        f = self.findings[index]
        cur = self.style_of("findings--cursor") if cursor else Style()
        sev = self.style_of(f"findings--{f.severity.value}")
        return Strip(segments([(f"{f.severity.value:<6}", sev + cur), (f"{f.message}", cur),
                               (f"  {f.place()}", self.style_of("findings--place") + cur)]))

    def on_row_view_cursor_moved(self, event: RowView.CursorMoved) -> None:
        if event.view is self and self.findings:
            event.stop()
            self.post_message(self.FindingSelected(self.findings[event.index]))

    def row_clicked(self, index: int, x: int) -> None:
        if index < self.row_count:
            self.move_to(index)
            self.post_message(self.FindingSelected(self.findings[index]))
