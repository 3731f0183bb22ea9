"""Modal screens: help (every binding, from the live keymap), the go-to and path prompts, the quit
prompt (unsaved work) and the snapshot picker.

Prompts never lose what was typed: an error is shown under the input and the text stays. Paths
complete with Tab (or → at the end of the line), the go-to prompt completes its keywords, and both
list every form they accept.
"""

from __future__ import annotations

import os
from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Input, Label, OptionList, Static

from ..trace.syntax import SyntaxProblem, parse_size

HELP_LEGEND = [
    "Map: N data here · N/- yellow: from a backing file · 0 zeros · C compressed · ! invalid (EIO)",
    "     s before the offset: the cluster is shared with a snapshot (no COPIED flag: a write copies it)",
    "Host view (h): one row per cluster of the file: header, l1, l2, refcount, data, compressed, free,",
    "     leaked (refcount but no reference), overlap (two owners); Enter jumps to the owner and back",
    "Trace: ✓ done · ▶ current · ✗ failed (the reason shows when selected) or cannot be replayed",
    "ctrl+p: command palette (go to offset/cluster/step, save as, snapshots, check, theme…)",
]


class HelpScreen(ModalScreen[None]):
    """Lists the app's bindings as they are now (a user keymap shows its keys here); scrolls."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close", id="help.close")]

    def __init__(self, rows: list[tuple[str, str, str]]):
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        lines = [Content.styled("Keys (remap any of them by its id in a keymap: `id = keys` lines)", "bold"),
                 Content("")]
        kw = max([len(k) for k, _, _ in self.rows] + [4]) + 2
        iw = max([len(b) for _, _, b in self.rows] + [4]) + 2
        for keys, desc, bid in self.rows:  # the description last: a long one wraps without breaking the columns
            lines.append(Content.assemble((f"{keys:<{kw}}", "bold $text-accent"), (f"{bid:<{iw}}", "$text-muted"), desc))
        lines.append(Content(""))
        lines += [Content.styled(text, "$text-muted") for text in HELP_LEGEND]
        with Vertical(id="help-box") as box:
            box.border_title = "qdebug help"
            box.border_subtitle = "↑↓ pgup pgdn scroll · escape closes"
            with VerticalScroll(id="help-scroll"):
                yield Static(Content("\n").join(lines))

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()


# ---- go to ------------------------------------------------------------------------------------
GOTO_FORMS = "offset: 0x120000  1M  64k · cluster: cluster 12  c12  #12 · step: step 3  s3"


def parse_target(text: str) -> tuple[str, int]:
    """'0x10000' / '64k' / 'offset 1M' -> ('offset', n); 'c 12', '#12', 'cluster 12' -> ('cluster', 12);
    'step 3' / 's3' -> ('step', 3)."""
    t = text.strip().lower()
    for prefix, kind in (("cluster", "cluster"), ("step", "step"), ("offset", "offset"),
                         ("#", "cluster"), ("c", "cluster"), ("s", "step")):
        rest = t[len(prefix):].strip()
        if t.startswith(prefix) and rest[:1].isdigit():
            return kind, parse_size(rest)
    if not t:
        raise SyntaxProblem("type an offset, 'cluster N' or 'step N'")
    return "offset", parse_size(t)


class KeywordSuggester(Suggester):
    """Completes the go-to prompt's words: `c` -> `cluster `, `s` -> `step `, `o` -> `offset `."""

    WORDS = ("cluster ", "step ", "offset ")

    def __init__(self):
        super().__init__(use_cache=False)

    async def get_suggestion(self, value: str) -> str | None:
        low = value.lower()
        if not low or low[0].isdigit():
            return None
        for word in self.WORDS:
            if word.startswith(low) and word != low:
                return word
        return None


class GotoScreen(ModalScreen[tuple[str, int] | None]):
    """One line prompt: an offset (qemu-io number syntax), `cluster N`, or `step N`. `check`
    (the app's) says whether the target exists: an error keeps the prompt and its text."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="goto.cancel"),
                Binding("tab", "complete", "Complete", show=False, priority=True)]

    def __init__(self, kind: str = "offset", check: Callable[[tuple[str, int]], str | None] | None = None):
        super().__init__()
        self.kind = kind
        self.check = check

    def compose(self) -> ComposeResult:
        hint = {"offset": "an offset, cluster N or step N", "cluster": "cluster number, e.g. 12",
                "step": "trace step, e.g. 3"}[self.kind]
        with Vertical(id="goto-box") as box:
            box.border_title = f"go to {self.kind}"
            box.border_subtitle = "enter go · tab completes · escape cancel"
            yield Input(placeholder=hint, id="goto-input",
                        suggester=KeywordSuggester() if self.kind == "offset" else None)
            yield Label(GOTO_FORMS, id="goto-forms")
            yield Label("", id="goto-error")

    def action_complete(self) -> None:
        self.query_one(Input).action_cursor_right()

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
        problem = self.check(target) if self.check else None
        if problem:
            self.query_one("#goto-error", Label).update(problem)
            return
        self.dismiss(target)


# ---- paths ------------------------------------------------------------------------------------
class PathSuggester(Suggester):
    """Completes a file path as a shell does: the longest name every match shares; `/` after a
    directory. Lists one directory (the file system, never the image)."""

    def __init__(self):
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        return complete_path(value)


def complete_path(value: str) -> str | None:
    if not value:
        return None
    folder, part = os.path.split(value)
    real = os.path.expanduser(folder or ".")
    try:
        names = sorted(n for n in os.listdir(real) if n.startswith(part) and (part or not n.startswith(".")))
    except OSError:
        return None
    if not names:
        return None
    common = os.path.commonprefix(names)
    done = os.path.join(folder, common) if folder else common
    if len(names) == 1 and os.path.isdir(os.path.join(real, common)):
        done += "/"
    return done if len(done) > len(value) else None


class PathScreen(ModalScreen[str | None]):
    """Asks for a file path. `accept(path)` (the app's) returns an error, or None when the path
    was taken: an error keeps the prompt open with the text as typed."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="path.cancel"),
                Binding("tab", "complete", "Complete", show=False, priority=True)]

    def __init__(self, title: str, hint: str, *, value: str = "", forms: str = "",
                 accept: Callable[[str], str | None] | None = None):
        super().__init__()
        self.title_text = title
        self.hint = hint
        self.value = value
        self.forms = forms
        self.accept = accept

    def compose(self) -> ComposeResult:
        with Vertical(id="goto-box") as box:
            box.border_title = self.title_text
            box.border_subtitle = "enter · tab completes the path · escape cancel"
            yield Input(value=self.value, placeholder=self.hint, id="path-input", suggester=PathSuggester())
            yield Label(self.forms or self.hint, id="path-forms")
            yield Label("", id="path-error")

    def action_complete(self) -> None:
        self.query_one(Input).action_cursor_right()

    def show_error(self, message: str) -> None:
        self.query_one("#path-error", Label).update(message)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        if not path:
            self.show_error("type a path (tab completes it)")
            return
        problem = self.accept(path) if self.accept else None
        if problem:
            self.show_error(problem)
            return
        self.dismiss(path)


# ---- quit with unsaved work ---------------------------------------------------------------------
class QuitScreen(ModalScreen[str | None]):
    """Unsaved steps or repairs in the scratch copy: s save them as a new image, d discard, Escape
    stay. Dismisses with "save", "discard" or None."""

    BINDINGS = [Binding("s", "dismiss('save')", "Save as new image", id="quit.save"),
                Binding("d", "dismiss('discard')", "Discard and quit", id="quit.discard"),
                Binding("escape", "dismiss(None)", "Cancel", id="quit.cancel")]

    def __init__(self, changes: int, image: str):
        super().__init__()
        self.changes = changes
        self.image = image

    def compose(self) -> ComposeResult:
        what = f"{self.changes} unsaved change{'s' if self.changes != 1 else ''}"
        with Vertical(id="quit-box") as box:
            box.border_title = "quit"
            yield Static(Content.assemble(
                (what, "bold $qd-warning"), " (steps and repairs) are in a scratch copy of ",
                (os.path.basename(self.image), "bold"), "; the image itself is untouched.\n\n",
                ("s", "bold $text-accent"), "       save them as a new image (asks where)\n",
                ("d", "bold $text-accent"), "       discard them and quit\n",
                ("escape", "bold $text-accent"), "  go back"))


class SnapshotScreen(ModalScreen[str | None]):
    """Pick the map to show: the active image or one internal snapshot (by ID)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="snapshot.cancel")]

    def __init__(self, snapshots: list[tuple[str, str]], current: str | None):
        super().__init__()
        self.snapshots = snapshots  # (id, label)
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="snapshot-box") as box:
            box.border_title = "show the map of"
            box.border_subtitle = "enter open · escape cancel"
            options = [("the active image (read and written)", "")] + [(label, sid) for sid, label in self.snapshots]
            ol = OptionList(*[text for text, _ in options], id="snapshot-list")
            self._ids = [sid for _, sid in options]
            yield ol

    def on_mount(self) -> None:
        ol = self.query_one(OptionList)
        ol.highlighted = self._ids.index(self.current or "") if (self.current or "") in self._ids else 0
        ol.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self._ids[event.option_index])
