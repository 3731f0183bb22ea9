"""Row lists beside the map: the trace timeline and the check findings (both Line-API views)."""

from __future__ import annotations

from rich.style import Style
from textual.message import Message
from textual.strip import Strip

from .rows import RowView, segments


class Timeline(RowView):
    """Trace steps: step k (1-based) is applied when k <= position. Clicking a step seeks to it."""

    COMPONENT_CLASSES = {"timeline--applied", "timeline--pending", "timeline--current", "timeline--cursor",
                         "timeline--error", "timeline--number"}

    class SeekRequested(Message):
        def __init__(self, position: int) -> None:
            super().__init__()
            self.position = position

    def __init__(self, **kw):
        super().__init__(**kw)
        self.commands: list = []
        self.position = 0
        self.errors: dict[int, str] = {}

    def set_trace(self, commands: list, position: int = 0) -> None:
        self.commands = commands
        self.position = position
        width = max([len(c.text) for c in commands] + [20]) + 14
        self.set_rows(len(commands), width)
        self.move_to(max(0, position - 1))
        self.border_subtitle = f"step {position} of {len(commands)}" if commands else ""

    def set_position(self, position: int, errors: dict[int, str] | None = None) -> None:
        self.position = position
        if errors is not None:
            self.errors = errors
        self.changed()
        self.move_to(max(0, position - 1))
        self.border_subtitle = f"step {position} of {len(self.commands)}"

    def cursor_style(self) -> Style:
        if self.cursor == self.position - 1:
            return self.style_of("timeline--applied") + self.style_of("timeline--current")
        return self.style_of("timeline--cursor")

    def row_key(self, index: int) -> tuple:
        return (self.position, index in self.errors)

    def render_row(self, index: int, cursor: bool) -> Strip:
        cmd = self.commands[index]
        step = index + 1
        applied = step <= self.position
        current = step == self.position
        base = self.style_of("timeline--applied" if applied else "timeline--pending")
        if index in self.errors:
            base = self.style_of("timeline--error")
        if current:
            base = base + self.style_of("timeline--current")
        elif cursor:
            base = base + self.style_of("timeline--cursor")
        mark = "▶" if current else "✓" if applied else " "
        where = f"  :{cmd.lineno}" if cmd.lineno else ""
        return Strip(segments([(f"{mark}{step:>4} ", base), (cmd.text or cmd.op, base),
                               (where, base + self.style_of("timeline--number"))]))

    def row_clicked(self, index: int, x: int) -> None:
        if index < self.row_count:
            self.move_to(index)
            self.post_message(self.SeekRequested(index + 1))


class FindingsView(RowView):
    """`check` findings, most severe first; selecting one moves the map to its guest offset."""

    COMPONENT_CLASSES = {"findings--error", "findings--leak", "findings--info", "findings--cursor",
                         "findings--place"}

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
        return Strip(segments([(f"{f.severity:<6}", sev + cur), (f"{f.message}", cur),
                               (f"  {f.place()}", self.style_of("findings--place") + cur)]))

    def on_row_view_cursor_moved(self, event: RowView.CursorMoved) -> None:
        if event.view is self and self.findings:
            event.stop()
            self.post_message(self.FindingSelected(self.findings[event.index]))

    def row_clicked(self, index: int, x: int) -> None:
        if index < self.row_count:
            self.move_to(index)
            self.post_message(self.FindingSelected(self.findings[index]))
