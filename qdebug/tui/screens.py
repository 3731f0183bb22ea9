"""Modal screens: help (every binding, from the live keymap), go-to prompts."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from ..trace.syntax import SyntaxProblem, parse_size


class HelpScreen(ModalScreen[None]):
    """Lists the app's bindings as they are now (a user keymap shows its keys here)."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close", id="help.close")]

    def __init__(self, rows: list[tuple[str, str, str]]):
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        lines = [Content.styled("Keys (remap any of them by its id in a keymap)", "bold"), Content("")]
        for keys, desc, bid in self.rows:
            lines.append(Content.assemble((f"{keys:<16}", "bold $accent"), f"{desc:<34}", (bid, "$text-muted")))
        lines += [Content(""), Content.styled(
            "Map colours: N data here · N/- yellow: from a backing file · 0 zeros · C compressed · ! invalid",
            "$text-muted"), Content.styled("ctrl+p: command palette (go to offset/cluster/step, check, theme…)",
                                           "$text-muted")]
        with Vertical(id="help-box") as box:
            box.border_title = "qdebug help"
            box.border_subtitle = "escape to close"
            with VerticalScroll():
                yield Static(Content("\n").join(lines))


def parse_target(text: str) -> tuple[str, int]:
    """'0x10000' / '64k' -> ('offset', n); 'c 12', '#12', 'cluster 12' -> ('cluster', 12);
    'step 3' / 's3' -> ('step', 3)."""
    t = text.strip().lower()
    for prefix, kind in (("cluster", "cluster"), ("step", "step"), ("offset", "offset"),
                         ("#", "cluster"), ("c", "cluster"), ("s", "step")):
        rest = t[len(prefix):].strip()
        if t.startswith(prefix) and rest[:1].isdigit():
            return kind, parse_size(rest)
    return "offset", parse_size(t)


class GotoScreen(ModalScreen[tuple[str, int] | None]):
    """One line prompt: an offset (qemu-io number syntax), `cluster N`, or `step N`."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="goto.cancel")]

    def __init__(self, kind: str = "offset"):
        super().__init__()
        self.kind = kind

    def compose(self) -> ComposeResult:
        hint = {"offset": "guest offset, e.g. 0x120000 or 1M (or 'cluster 12', 'step 3')",
                "cluster": "cluster number, e.g. 12", "step": "trace step, e.g. 3"}[self.kind]
        with Vertical(id="goto-box") as box:
            box.border_title = f"go to {self.kind}"
            yield Input(placeholder=hint, id="goto-input")
            yield Label("", id="goto-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        try:
            if self.kind == "offset":
                target = parse_target(text)
            else:
                target = (self.kind, parse_size(text.split()[-1] if text else text))
        except SyntaxProblem as e:
            self.query_one("#goto-error", Label).update(str(e))
            return
        self.dismiss(target)


class PathScreen(ModalScreen[str | None]):
    """Asks for a file path (open trace)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="path.cancel")]

    def __init__(self, title: str, hint: str):
        super().__init__()
        self.title_text = title
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(id="goto-box") as box:
            box.border_title = self.title_text
            yield Input(placeholder=self.hint, id="path-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)
