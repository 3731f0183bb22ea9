"""The qdebug Textual app: panels that are views over one `ImageModel` (and a Session, a CheckReport).

`make_app()` is shared by the CLI and the tests. Engine work that can take long (whole-image
scans, check, replay to a far step) runs in thread workers that post `Progress` messages; the UI
thread only reads numpy views of the mapped image and draws the visible rows.
"""

from __future__ import annotations

import os

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, ProgressBar, Static, TabbedContent, TabPane

from ..engine.chain import open_chain
from .cluster_map import ClusterMap
from .inspector import Inspector
from .lists import FindingsView, Timeline
from .messages import CheckFinished, CountsReady, ImageOpened, Jumped, Progress
from .model import ImageModel
from .palette import QDebugCommands
from .panels import chain_content, counts_content, header_content
from .screens import GotoScreen, HelpScreen


class QDebugApp(App):
    CSS_PATH = "qdebug.tcss"
    COMMANDS = App.COMMANDS | {QDebugCommands}
    TITLE = "qdebug"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]

    BINDINGS = [
        Binding("n,right_square_bracket", "step(1)", "Next step", id="step.next", key_display="n/]"),
        Binding("p,left_square_bracket", "step(-1)", "Prev step", id="step.prev", key_display="p/["),
        Binding("g", "goto('offset')", "Go to", id="goto"),
        Binding("i", "next('invalid')", "Next invalid", id="next.invalid"),
        Binding("a", "next('allocated')", "Next allocated", show=False, id="next.allocated"),
        Binding("z", "next('zero')", "Next zero", show=False, id="next.zero"),
        Binding("c", "check", "Check", id="check"),
        Binding("r", "repair", "Repair", id="repair"),
        Binding("u", "undo_repair", "Undo repair", show=False, id="repair.undo"),
        Binding("tab", "app.focus_next", "Next panel", show=False, id="focus.next"),
        Binding("question_mark,f1", "help", "Help", id="help", key_display="?"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, image: str, *, trace: str | None = None, write: bool = False,
                 keymap: dict[str, str] | None = None, counts: bool = True):
        super().__init__()
        self.image_path = image
        self.trace_path = trace
        self.write = write
        self.want_counts = counts
        self.chain = open_chain(image)
        self.model = ImageModel(self.chain)
        self.counts: dict[str, int] | None = None
        self.report = None
        self.sub_title = os.path.basename(image) + ("" if write else "  (read-only)")
        if keymap:
            self.set_keymap(keymap)

    # ---- layout ----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="top"):
            yield Static(id="header-panel", classes="panel")
            with Vertical(id="chain-box", classes="panel"):
                yield Static(id="chain-panel")
                yield Static(id="counts-panel")
        with Horizontal(id="middle"):
            yield ClusterMap(self.model, id="map", classes="panel")
            yield Inspector(id="inspector", classes="panel")
        with Horizontal(id="bottom"):
            yield Timeline(id="timeline", classes="panel")
            with TabbedContent(id="detail"):
                with TabPane("COW plan", id="tab-plan"):
                    with VerticalScroll(id="plan-scroll"):
                        yield Static(id="plan")
                with TabPane("check", id="tab-check"):
                    yield FindingsView(id="findings")
        with Horizontal(id="status"):
            yield Static("", id="status-text")
            yield ProgressBar(id="progress", show_eta=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#header-panel").border_title = "image"
        self.query_one("#chain-box").border_title = "backing chain"
        self.query_one("#map").border_title = "cluster map"
        self.query_one("#timeline").border_title = "trace"
        self.query_one("#plan", Static).update("no trace loaded (qdebug IMAGE --trace FILE, or ctrl+p: open trace)")
        self.query_one("#progress").display = False
        self.refresh_panels()
        self.fit_map()
        cmap = self.query_one(ClusterMap)
        cmap.focus()
        self.show_selection()
        self.post_message(ImageOpened(self.image_path, self.model.nclusters))
        if self.want_counts:
            self.call_after_refresh(self.count_types)  # after the first screen: it competes for the GIL

    def on_resize(self) -> None:
        self.fit_map()

    def fit_map(self) -> None:
        """The map is as wide as its rows beside the inspector, full width when stacked."""
        cmap = self.cluster_map
        cmap.styles.width = "1fr" if self.size.width < 110 else cmap.row_width_needed()

    def refresh_panels(self) -> None:
        self.query_one("#header-panel", Static).update(header_content(self.chain))
        self.query_one("#chain-panel", Static).update(chain_content(self.chain))
        self.query_one("#counts-panel", Static).update(counts_content(self.counts))

    # ---- selection -------------------------------------------------------------------------
    @property
    def cluster_map(self) -> ClusterMap:
        return self.query_one(ClusterMap)

    def show_selection(self) -> None:
        cmap = self.cluster_map
        self.query_one(Inspector).show(self.model, cmap.cursor, cmap.subcluster)
        cmap.border_subtitle = f"cluster {cmap.cursor} of {self.model.nclusters}, subcluster {cmap.subcluster}"

    @on(ClusterMap.SubclusterSelected)
    def _selected(self, event: ClusterMap.SubclusterSelected) -> None:
        self.show_selection()

    def image_changed(self) -> None:
        """Engine state changed under us: every view re-reads it."""
        self.model.invalidate()
        self.cluster_map.sync()
        self.refresh_panels()
        self.show_selection()

    # ---- long work -------------------------------------------------------------------------
    @on(Progress)
    def _progress(self, event: Progress) -> None:
        bar = self.query_one("#progress", ProgressBar)
        status = self.query_one("#status-text", Static)
        if event.fraction is None:
            bar.display = False
            status.update("")
            return
        bar.display = True
        bar.update(total=100, progress=round(event.fraction * 100))
        status.update(event.what)

    @work(thread=True, exclusive=True, group="counts")
    def count_types(self) -> None:
        what = "counting subclusters"
        self.post_message(Progress(what, 0.0))
        counts = self.model.count_types(lambda f: self.post_message(Progress(what, f)))
        self.post_message(CountsReady(counts))
        self.post_message(Progress(what, None))

    @on(CountsReady)
    def _counts(self, event: CountsReady) -> None:
        self.counts = event.counts
        self.query_one("#counts-panel", Static).update(counts_content(self.counts))

    # ---- navigation ------------------------------------------------------------------------
    def action_goto(self, kind: str = "offset") -> None:
        self.push_screen(GotoScreen(kind), self.goto)

    def goto(self, target: tuple[str, int] | None) -> None:
        if target is None:
            return
        kind, value = target
        if kind == "step":
            self.seek(value)
            return
        cluster = value // self.model.cluster_size if kind == "offset" else value
        if not 0 <= cluster < self.model.nclusters:
            self.notify(f"{kind} {value:#x} is past the end of the image", severity="error")
            return
        sc = (value % self.model.cluster_size) // self.model.subcluster_size if kind == "offset" else 0
        self.cluster_map.select(cluster, sc)

    def action_next(self, what: str) -> None:
        self.find_next(what, self.cluster_map.cursor)

    @work(thread=True, exclusive=True, group="search")
    def find_next(self, what: str, start: int) -> None:
        self.post_message(Jumped(what, self.model.find_next(start, what)))

    @on(Jumped)
    def _jumped(self, event: Jumped) -> None:
        if event.cluster is None:
            self.notify(f"no {event.what} cluster after cluster {self.cluster_map.cursor}")
            return
        self.cluster_map.select(event.cluster, 0)

    def action_help(self) -> None:
        rows = []
        for binding in self._bindings_for_help():
            rows.append((binding.key_display or binding.key, binding.description, binding.id or ""))
        self.push_screen(HelpScreen(rows))

    def _bindings_for_help(self):
        seen = set()
        for node in [self, *self.cluster_map.ancestors_with_self][::-1] + [self.cluster_map]:
            for bindings in node._bindings.key_to_bindings.values():
                for b in bindings:
                    if b.id and b.id not in seen and not b.system:
                        seen.add(b.id)
                        yield b

    def action_export_screenshot(self) -> None:
        path = self.save_screenshot()
        self.notify(f"screenshot saved: {path}")

    # ---- features that arrive with the write side ------------------------------------------
    def seek(self, position: int) -> None:
        self.notify("no trace loaded: open one with ctrl+p 'open trace'", severity="warning")

    def action_open_trace(self) -> None:
        self.notify("opening traces is not available yet", severity="warning")

    def action_step(self, delta: int) -> None:
        self.seek(0)

    def action_check(self) -> None:
        self.run_check()

    @work(thread=True, exclusive=True, group="engine")
    def run_check(self) -> None:
        from ..engine.check import check_image

        what = "checking"
        self.post_message(Progress(what, 0.0))
        report = check_image(self.model.img, progress=lambda done, total: self.post_message(
            Progress(what, done / max(1, total))))
        self.post_message(Progress(what, None))
        self.post_message(CheckFinished(report))

    @on(CheckFinished)
    def _checked(self, event: CheckFinished) -> None:
        r = event.report
        self.report = r
        self.query_one(FindingsView).set_findings(r.findings)
        self.query_one(TabbedContent).active = "tab-check"
        summary = (f"check: {r.corruptions} corruption(s), {r.leaks} leak(s), {r.check_errors} check error(s)"
                   if r.exit_code else "check: no errors were found on the image")
        self.query_one(TabbedContent).get_tab("tab-check").label = f"check ({len(r.findings)})"
        self.notify(summary, severity="error" if r.exit_code in (1, 2) else "information")

    @on(FindingsView.FindingSelected)
    def _finding(self, event: FindingsView.FindingSelected) -> None:
        f = event.finding
        if f.guest_offset is not None and f.guest_offset < self.chain.size:
            sc = f.subclusters[0] if f.subclusters else None
            self.cluster_map.select(f.guest_offset // self.model.cluster_size, sc)

    def action_repair(self) -> None:
        self.notify("repair is not available yet", severity="warning")

    def action_undo_repair(self) -> None:
        self.notify("nothing to undo", severity="warning")


def make_app(image: str, *, trace: str | None = None, write: bool = False, **kw) -> QDebugApp:
    return QDebugApp(image, trace=trace, write=write, **kw)
