"""The qdebug Textual app: panels that are views over one `Workbench` (chain, Session, CheckReport).

`make_app()` is shared by the CLI and the tests. Engine work runs in thread workers of one
exclusive group ("engine"), so a step, an undo, a check and a repair never overlap; they post
messages (`StepChanged`, `CheckFinished`, `RepairApplied`, `Progress`) and the handlers, on the UI
thread, re-read the engine state into the views. The UI thread itself only reads numpy views of
the mapped image for the visible rows, always under the model's ImageIOLock (an engine job holds
its exclusive side while it changes the file).

Views: the cluster map (the active image, or an internal snapshot's L1 opened read-only with `S`)
or the host view (`h`: one row per host cluster, from the engine's host layout); the inspector
follows the selection. Without --write, every change lands in a scratch copy: the header says how
many changes are unsaved, ctrl+s / the palette saves them as a new image, and quitting asks.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ScrollableContainer, Vertical
from textual.content import Content
from textual.css.query import NoMatches
from textual.widgets import Header, ProgressBar, Static, TabbedContent, TabPane

from ..engine.check.checker import Severity
from ..engine.errors import QcowError
from ..engine.write.plan import WritePlan
from ..engine.write.step import StepRecord
from ..engine.file.chain import Chain
from .cluster_map import ClusterMap
from .footer import FitFooter
from .host_view import HostView
from .inspector import Inspector
from .iolock import ImageIOLock
from .lists import FindingsView, Timeline
from .messages import (
    CheckFinished,
    CountsReady,
    HostLayoutReady,
    ImageOpened,
    Jumped,
    PlanPreviewed,
    Progress,
    QuitAsked,
    RepairApplied,
    RepairPlanned,
    RepairReady,
    Saved,
    SnapshotOpened,
    SnapshotsListed,
    StepChanged,
)
from .model import ImageModel
from .palette import QDebugCommands
from .panels import chain_content, counts_content, header_content
from .plan_view import RunningCost, plan_clusters, plan_content
from .rows import RowView
from .screens import GotoScreen, HelpScreen, PathScreen, QuitScreen, SnapshotScreen
from .theme import qdebug_variables
from .workbench import RepairAction, Serial, StepAction, Workbench


class QDebugApp(App):
    CSS_PATH = "qdebug.tcss"
    TITLE = "qdebug"
    COMMANDS = App.COMMANDS | {QDebugCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]

    # description: the footer's word; tooltip: the help screen's line
    BINDINGS = [
        Binding("n,right_square_bracket", "step(1)", "Step", id="step.next", key_display="n/]",
                tooltip="Next step of the trace"),
        Binding("p,left_square_bracket", "step(-1)", "Undo", id="step.prev", key_display="p/[",
                tooltip="Undo the newest step or repair"),
        Binding("g", "goto('offset')", "Go to", id="goto", tooltip="Go to an offset, cluster N or step N"),
        Binding("i", "next('invalid')", "Next invalid", id="next.invalid",
                tooltip="Next invalid entry (host view: next problem)"),
        Binding("a", "next('allocated')", "Next allocated", show=False, id="next.allocated"),
        Binding("z", "next('zero')", "Next zero", show=False, id="next.zero"),
        Binding("c", "check", "Check", id="check", tooltip="Check the image (qemu-img check) in the background"),
        Binding("r", "repair", "Repair", id="repair", tooltip="Repair the selected entry (a in the dialog: all)"),
        Binding("h", "toggle_host", "Host view", id="view.host",
                tooltip="Host view (one row per host cluster) / guest view"),
        Binding("P", "show_tab('tab-plan')", "COW plan", show=False, id="view.plan", tooltip="Show the COW plan"),
        Binding("C", "show_tab('tab-check')", "Check results", show=False, id="view.check",
                tooltip="Show the check results"),
        Binding("S", "snapshots", "Snapshot map", show=False, id="view.snapshot",
                tooltip="Map of an internal snapshot (read-only) / the active image"),
        Binding("u", "undo_repair", "Undo repair", show=False, id="repair.undo"),
        Binding("o", "open_trace", "Open trace", show=False, id="trace.open", tooltip="Open a trace file"),
        Binding("ctrl+s", "save_as", "Save as", show=False, id="save",
                tooltip="Save the scratch copy (steps, repairs) as a new image"),
        Binding("plus,equals_sign", "resize(2)", "Taller step area", show=False, id="layout.grow"),
        Binding("minus", "resize(-2)", "Shorter step area", show=False, id="layout.shrink"),
        Binding("greater_than_sign", "widen(4)", "Wider trace column", show=False, id="layout.wider",
                key_display=">"),
        Binding("less_than_sign", "widen(-4)", "Narrower trace column", show=False, id="layout.narrower",
                key_display="<"),
        Binding("question_mark,f1", "help", "Help", id="help", key_display="?"),
        Binding("q", "quit", "Quit", id="quit", tooltip="Quit (asks when there are unsaved changes)"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True, id="quit.ctrl_c"),
    ]

    def __init__(self, image: str, *, trace: str | None = None, write: bool = False,
                 keymap: dict[str, str] | None = None, counts: bool = True):
        super().__init__()
        self.image_path = image
        self._running_cost = RunningCost()  # the COW plan panel's "so far" line (prefix sums of step costs)
        self.want_counts = counts
        self.bench = Workbench(image, write=write)
        self.serial = Serial()
        self.trace_problems = self.bench.load_trace(trace) if trace else []
        self.model = ImageModel(self.bench.chain, ImageIOLock())
        self.counts: dict[str, int] | None = None
        self.report = None
        self.report_generation = -1  # Workbench.generation the report was made at
        self._shown: dict = {}
        self.check_in_child = False  # force the child-process check (tests); large images always use it
        self.steps_shown = 0  # StepChanged messages handled (benchmarks and tests wait on it)
        self.status_note = ""  # what the status row says when no progress is shown
        # the host view: its layout, and the change generation it was made at
        self.host_layout = None
        self.host_generation = -1
        self.host_pending: int | None = None  # host cluster to select once the layout arrives
        self._owner_turn: tuple[int, int] = (-1, 0)  # (host cluster, owner index) of the last Enter
        # the map of an internal snapshot (read-only), when shown instead of the active image's
        self.snap_model: ImageModel | None = None
        self.snap_id: str | None = None
        self._signals: dict = {}
        self.show_session_state()
        if keymap:
            self.set_keymap(keymap)

    # ---- theme -------------------------------------------------------------------------------
    def get_css_variables(self) -> dict[str, str]:
        """Textual's variables for the current theme, plus qdebug's own colours derived from them."""
        variables = super().get_css_variables()
        variables.update(qdebug_variables(variables))
        self.theme_variables = variables
        return variables

    @property
    def chain(self):
        return self.bench.chain

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
            yield HostView(id="host", classes="panel")
            yield Inspector(id="inspector", classes="panel")
        with Horizontal(id="bottom"):
            yield Timeline(id="timeline", classes="panel")
            with TabbedContent(id="detail"):
                with TabPane("COW plan", id="tab-plan"):
                    with ScrollableContainer(id="plan-scroll"):
                        yield Static(id="plan")
                with TabPane("check", id="tab-check"):
                    yield Static(id="check-status")
                    yield FindingsView(id="findings")
        with Horizontal(id="status"):
            yield Static("", id="status-text")
            yield ProgressBar(id="progress", show_eta=False)
        yield FitFooter()

    def on_mount(self) -> None:
        self.query_one("#header-panel").border_title = "image"
        self.query_one("#chain-box").border_title = "backing chain"
        self.query_one("#map").border_title = "cluster map"
        self.query_one("#timeline").border_title = "trace"
        self.query_one("#host").border_title = "host view"
        self.query_one("#host").display = False
        self.query_one("#progress").display = False
        self.show_trace()
        self.refresh_panels()
        self.show_plan()
        self.update_check_tab()
        self.fit_map()
        self.cluster_map.focus()
        self.show_selection()
        self.post_message(ImageOpened(self.image_path, self.model.nclusters))
        if self.want_counts:
            self.set_timer(1.0, self.count_types)  # once the first screen is up: the scan competes for the GIL
        if self.bench.commands:
            self.call_after_refresh(self.engine_job, self._open_replay)  # so step 1's plan can be previewed
        self.catch_signals()

    def catch_signals(self) -> None:
        """SIGTERM / SIGHUP end the app the way `q` then `d` would (the scratch copy is removed, the
        terminal restored), through the event loop rather than an exception in the middle of it."""
        if threading.current_thread() is not threading.main_thread():
            return
        import asyncio

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                old = signal.getsignal(sig)
                loop.add_signal_handler(sig, self.terminated, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            self._signals[sig] = old

    def terminated(self, sig: int) -> None:
        self.exit(return_code=128 + sig, message=f"qdebug: terminated by {signal.Signals(sig).name}")

    def _open_replay(self) -> None:
        try:
            replaced = self.bench.ensure_replay()
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        if replaced:
            self.post_message(StepChanged(self.bench.position, self.bench.last_record, opened=True))

    def on_unmount(self) -> None:
        import asyncio

        for sig, old in self._signals.items():
            try:
                asyncio.get_running_loop().remove_signal_handler(sig)
            except RuntimeError:
                pass
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._signals = {}
        self.close_snapshot()
        self.bench.close()

    def on_resize(self) -> None:
        self.fit_map()
        self.query_one(FitFooter).refresh(recompose=True)  # which keys fit depends on the width

    def fit_map(self) -> None:
        """The map is as wide as its rows beside the inspector, full width when stacked."""
        cmap = self.cluster_map
        width = "1fr" if self.size.width < 110 else cmap.row_width_needed()
        if str(cmap.styles.width) != str(width):  # a style change is a relayout: only when it differs
            cmap.styles.width = width
        footer = self.query_one(FitFooter)
        if footer.compact != (self.size.width < 110):
            footer.compact = self.size.width < 110

    def refresh_panels(self) -> None:
        """Header, chain and counts panels (fixed sizes: an update repaints them, no relayout)."""
        with self.model.io_lock.reading():  # the header panel reads the L1 and snapshot tables
            header = header_content(self.chain)
            chain = chain_content(self.chain, scratch=self.bench.scratch_path)
            snapshots = bool(self.chain.top.snapshots())  # the header panel lists them: one line taller
        for wid, content in (("#header-panel", header), ("#chain-panel", chain),
                             ("#counts-panel", counts_content(self.counts))):
            key = (content.plain, tuple(content.spans))  # Content's == compares the text only
            if self._shown.get(wid) != key:
                self._shown[wid] = key
                self.query_one(wid, Static).update(content, layout=False)
        top = self.query_one("#top")
        if top.has_class("-snapshots") != snapshots:
            top.set_class(snapshots, "-snapshots")

    def show_session_state(self) -> None:
        """The header line: the image, and at all times whether changes are unsaved."""
        bench = self.bench
        name = os.path.basename(self.image_path)
        n = bench.unsaved_changes
        if bench.write:
            state = "writing the image itself (journaled: p undoes)"
        elif n:
            state = f"● {n} unsaved change{'s' if n != 1 else ''} in a scratch copy (ctrl+s saves as a new image)"
        elif bench.saved_path and bench.actions:
            state = f"saved as {os.path.basename(bench.saved_path)}"
        else:
            state = "no unsaved changes (steps and repairs go to a scratch copy)"
        self.sub_title = f"{name}  —  {state}"

    def set_status(self, note: str) -> None:
        """The status row's note (a progress bar's label replaces it while long work runs)."""
        self.status_note = note
        try:
            if not self.query_one("#progress", ProgressBar).display:
                self.query_one("#status-text", Static).update(note)
        except NoMatches:
            pass

    # ---- selection -------------------------------------------------------------------------
    @property
    def cluster_map(self) -> ClusterMap:
        return self.query_one(ClusterMap)

    @property
    def map_model(self) -> ImageModel:
        """The model the cluster map shows: the active image's, or a snapshot's."""
        return self.snap_model or self.model

    @property
    def host_mode(self) -> bool:
        return bool(self.query_one(HostView).display)

    def show_selection(self) -> None:
        if self.host_mode:
            self.show_host_selection()
            return
        cmap = self.cluster_map
        model = self.map_model
        self.query_one(Inspector).show(model, cmap.cursor, cmap.subcluster)
        cmap.border_subtitle = f"cluster {cmap.cursor} of {model.nclusters}, subcluster {cmap.subcluster}"

    @on(ClusterMap.SubclusterSelected)
    def _selected(self, event: ClusterMap.SubclusterSelected) -> None:
        self.show_selection()

    def image_changed(self, changes: list | None = None, *, show: bool = True) -> None:
        """Engine state changed (a step, an undo, a repair): every view re-reads it. `changes` (the
        step's ClusterChanges) update the subcluster counts in place instead of a whole-image scan."""
        replaced = self.model.chain is not self.chain
        if replaced:
            old = self.model.chain
            self.model.set_chain(self.chain)
            if old is not self.chain:
                self.bench.close_replaced(old)
        else:
            self.model.invalidate()
        if self.snap_model is not None:
            if replaced:  # the session opened its scratch copy: the snapshot is read from there now
                self.engine_job(self._open_snapshot, self.snap_id)
            else:
                self.snap_model.invalidate()
        self.cluster_map.sync()
        self.refresh_panels()
        self.show_session_state()
        self.update_check_tab()
        if self.host_mode and self.host_generation != self.bench.generation:
            self.engine_job(self._host_layout)
        if show:
            self.show_selection()
        if self.want_counts:
            if changes is not None and self.counts is not None:
                self.counts = self.model.count_delta(self.counts, changes)
                self.refresh_panels()
            else:
                self.count_types()

    # ---- long work -------------------------------------------------------------------------
    @on(Progress)
    def _progress(self, event: Progress) -> None:
        try:
            bar = self.query_one("#progress", ProgressBar)
            status = self.query_one("#status-text", Static)
        except NoMatches:
            return  # a worker outlived the app's widgets
        if event.fraction is None:
            bar.display = False
            status.update(self.status_note)
            return
        bar.display = True
        bar.update(total=100, progress=round(event.fraction * 100))
        status.update(event.what)

    @work(thread=True, exclusive=True, group="counts")
    def count_types(self) -> None:
        what = "counting subclusters"
        model = self.model
        version = model.version
        counts = model.count_types(throttled(lambda f: self.post_message(Progress(what, f))))
        self.post_message(Progress(what, None))
        if model.version == version:
            self.post_message(CountsReady(counts))

    @on(CountsReady)
    def _counts(self, event: CountsReady) -> None:
        self.counts = event.counts
        try:
            self.refresh_panels()
        except NoMatches:
            pass  # the app is closing

    # ---- navigation ------------------------------------------------------------------------
    def action_goto(self, kind: str = "offset") -> None:
        self.push_screen(GotoScreen(kind, self.goto_problem), self.goto)

    def goto_problem(self, target: tuple[str, int]) -> str | None:
        """Why `target` cannot be gone to (the prompt shows it and keeps the text), or None."""
        kind, value = target
        model = self.map_model
        if kind == "step":
            if not self.bench.commands:
                return "no trace loaded (o opens one)"
            if value > len(self.bench.commands):
                return f"step {value}: the trace has {len(self.bench.commands)} steps"
            return None
        cluster = value // model.cluster_size if kind == "offset" else value
        if not 0 <= cluster < model.nclusters:
            shown = f"0x{value:x}" if kind == "offset" else str(value)
            return f"{kind} {shown} is past the end of the image ({model.nclusters} clusters, 0x{model.chain.size:x} bytes)"
        return None

    def goto(self, target: tuple[str, int] | None) -> None:
        if target is None:
            return
        problem = self.goto_problem(target)
        if problem:
            self.notify(problem, severity="error")
            return
        kind, value = target
        if kind == "step":
            self.seek(value)
            return
        if self.host_mode:
            self.set_host_mode(False)
        model = self.map_model
        cluster = value // model.cluster_size if kind == "offset" else value
        sc = (value % model.cluster_size) // model.subcluster_size if kind == "offset" else 0
        self.cluster_map.select(cluster, sc)

    def action_next(self, what: str) -> None:
        if self.host_mode:
            self.next_problem()
            return
        self.find_next(what, self.cluster_map.cursor)

    @work(thread=True, exclusive=True, group="search")
    def find_next(self, what: str, start: int) -> None:
        self.post_message(Jumped(what, self.map_model.find_next(start, what)))

    @on(Jumped)
    def _jumped(self, event: Jumped) -> None:
        if event.cluster is None:
            self.notify(f"no {event.what} cluster after cluster {self.cluster_map.cursor}")
            return
        self.cluster_map.select(event.cluster, 0)

    def action_resize(self, delta: int) -> None:
        """Grow or shrink the step area (timeline and plan) at the expense of the map."""
        bottom = self.query_one("#bottom")
        height = bottom.outer_size.height or 12
        bottom.styles.height = max(4, min(self.size.height - 8, height + delta))

    def action_widen(self, delta: int) -> None:
        """Widen or narrow the trace column (long commands end in `…` until they fit; ← → scroll it)."""
        timeline = self.query_one(Timeline)
        width = timeline.outer_size.width or 33
        timeline.styles.width = max(16, min(self.size.width - 20, width + delta))

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_rows()))

    def help_rows(self) -> list[tuple[str, str, str]]:
        """(keys, description, binding id) of every binding of the app and its views, as the keymap
        has them now (keys of views that are not focused come from their declarations)."""
        keys: dict[str, list[str]] = {}
        first: dict[str, Binding] = {}
        for key, active in self.screen.active_bindings.items():  # the keymap is applied here
            b = active.binding
            if b.id and not b.system:
                first.setdefault(b.id, b)
                keys.setdefault(b.id, []).append(self.get_key_display(b.with_key(key, None)))
        declared = [*self.BINDINGS, *ClusterMap.BINDINGS, *HostView.BINDINGS, *Timeline.BINDINGS,
                    *RowView.BINDINGS]
        for b in declared:  # bindings of views that are not focused now
            if b.id and b.id not in first and not b.system:
                first[b.id] = b
                keys[b.id] = [self.get_key_display(b.with_key(k, None))
                              for k in self._keymap_keys(b.id, b.key).split(",")]
        order = {b.id: i for i, b in enumerate(declared)}
        ids = sorted(first, key=lambda bid: order.get(bid, len(order)))
        return [("/".join(keys[bid]), first[bid].tooltip or first[bid].description, bid) for bid in ids]

    def _keymap_keys(self, bid: str, default: str) -> str:
        return self._keymap.get(bid, default) if getattr(self, "_keymap", None) else default

    def action_export_screenshot(self) -> None:
        path = self.save_screenshot()
        self.notify(f"screenshot saved: {path}")

    # ---- trace -----------------------------------------------------------------------------
    def action_open_trace(self) -> None:
        self.push_screen(PathScreen("open trace", "a qemu-io command file (tab completes)",
                                    value=self.bench.trace_path or "",
                                    forms="a file of qemu-io commands (write, read, discard, flush...), "
                                          "one a line", accept=self.open_trace))

    def open_trace(self, path: str) -> str | None:
        """Load a trace (from the prompt): None when loaded, else why not (the prompt keeps the text).
        Reads the trace file only; lines that cannot be replayed are listed and marked."""
        try:
            problems = self.bench.load_trace(path)
        except QcowError as e:
            return str(e)
        self.trace_problems = problems
        self.show_trace()
        self.engine_job(self._open_replay)
        self.show_plan()
        blocked = f"; line {problems[0].lineno} cannot be replayed (marked ✗), the session stops before it" \
            if problems else ""
        self.notify(f"{len(self.bench.commands)} commands from {os.path.basename(path)}: n steps, p undoes{blocked}",
                    severity="warning" if problems else "information")
        return None

    def show_trace(self) -> None:
        self.query_one(Timeline).set_trace(self.bench.listing, len(self.bench.commands), self.bench.position)
        self.set_status(self.trace_note())

    def trace_note(self) -> str:
        """What the status row says about the trace when no line is selected that failed."""
        if not self.trace_problems:
            return ""
        t = self.trace_problems[0]
        more = len(self.trace_problems) - 1
        return f"✗ line {t.lineno} cannot be replayed: {t.problem}" + (f" (and {more} more lines)" if more else "")

    def action_step(self, delta: int) -> None:
        if delta > 0 and not self.bench.commands:
            self.notify("no trace loaded: qdebug IMAGE --trace FILE, or o / ctrl+p 'open trace'", severity="warning")
            return
        self.move(delta)  # "at the end" / "nothing to undo" are decided in order, by the job itself

    def seek(self, position: int) -> None:
        if not self.bench.commands:
            self.notify("no trace loaded", severity="warning")
            return
        self.move(None, position)

    @on(Timeline.SeekRequested)
    def _seek_requested(self, event: Timeline.SeekRequested) -> None:
        self.seek(event.position if event.position != self.bench.position else event.position - 1)

    # ---- engine jobs: serialised in the order of the keys that asked for them ------------------
    def engine_job(self, fn, *args) -> None:
        self._engine_worker(self.serial.take(), fn, args)

    @work(thread=True, group="engine")
    def _engine_worker(self, ticket: int, fn, args) -> None:
        with self.serial.turn(ticket), self.model.io_lock.writing():
            fn(*args)

    def move(self, delta: int | None, position: int = 0) -> None:
        self.engine_job(self._move, delta, position)

    def _move(self, delta: int | None, position: int = 0) -> None:
        """One step (+1), one undo (-1), or a seek to `position` (delta None), off the UI thread."""
        bench = self.bench
        undone = None
        changes = None
        try:
            if delta is not None and delta > 0:
                if bench.position >= len(bench.commands):
                    blocked = bench.blocked_at
                    self.notify(f"line {blocked.lineno} cannot be replayed: {blocked.problem}" if blocked
                                else "at the end of the trace", severity="warning" if blocked else "information")
                    return
                rec = bench.step()
                changes = step_changes(rec, +1)
            elif delta is not None:
                undone = bench.undo()
                if undone is None:
                    self.notify("nothing to undo")
                    return
                changes = step_changes(undone.record, -1) if isinstance(undone, StepAction) else None
            else:
                what = f"replaying to step {position}"
                self.post_message(Progress(what, 0.0))
                bench.seek(position, lambda done, total: self.post_message(Progress(what, done / total)))
                self.post_message(Progress(what, None))
        except QcowError as e:
            self.post_message(Progress("", None))
            self.notify(str(e), severity="error")
        if isinstance(undone, RepairAction):
            self.post_message(RepairApplied(undone.plan, undone=True))
            return
        self.post_message(StepChanged(bench.position, bench.last_record, changes))

    @on(StepChanged)
    def _stepped(self, event: StepChanged) -> None:
        self.steps_shown += 1
        plan = self.bench_plan()
        clusters = plan_clusters(plan, self.model.cluster_size) if plan is not None else []
        target = clusters[0] if clusters and clusters[0] < self.model.nclusters else None
        if not event.opened:
            if self.snap_model is not None:
                self.close_snapshot()  # a step changes the active image: show it
            if self.host_mode and target is not None:
                self.set_host_mode(False)
            self.query_one(TabbedContent).active = "tab-plan"  # a new step brings its COW plan forward
        self.image_changed(event.changes, show=target is None)
        errors = {a.record.index: a.record.error for a in self.bench.actions
                  if isinstance(a, StepAction) and a.record.error}
        timeline = self.query_one(Timeline)
        timeline.set_position(event.position, errors)
        self.set_status(timeline.reason(timeline.cursor) or self.trace_note())
        self.show_plan()
        rec = event.record
        if rec is not None and rec.error:
            self.notify(f"step {rec.index + 1}: {rec.error}", severity="warning")
        if target is not None and not self.host_mode:
            self.cluster_map.select(target)  # its SubclusterSelected refreshes the inspector

    def on_row_view_cursor_moved(self, event: RowView.CursorMoved) -> None:
        """The timeline's selection: a failed step or a line that cannot run says why."""
        if isinstance(event.view, Timeline):
            self.set_status(event.view.reason(event.index) or self.trace_note())
        elif isinstance(event.view, HostView):
            self.show_host_selection()

    def bench_plan(self) -> WritePlan | None:
        """The plan the COW panel shows: the last applied step's (None at position 0)."""
        rec = self.bench.last_record
        return rec.plan if rec is not None else None

    def show_plan(self) -> None:
        """The plan of the last applied step; at position 0 a preview of the next one, planned by
        an engine job (planning reads the image: never on the UI thread)."""
        bench = self.bench
        static = self.query_one("#plan", Static)
        if not bench.commands:
            static.update("no trace loaded (qdebug IMAGE --trace FILE, or o / ctrl+p: open trace)")
            return
        rec = bench.last_record
        if rec is not None:
            title = f"step {rec.index + 1} of {len(bench.commands)} (applied)"
            if not rec.changes_image:
                title += f": {rec.command.source_text} (no writes)"
            if rec.error:
                title += f"  ✗ failed: {rec.error}"
            static.update(plan_content(rec.plan, self.model.cluster_size, self.model.spc, title=title, cost=rec.cost,
                                       total=self._running_cost.upto(bench.replay.records) if bench.replay else None))
            return
        static.update(plan_content(None, 0, 1, title="step 1, not applied yet: planning it…"))
        self.engine_job(self._preview)

    def _preview(self) -> None:
        """Engine job: the next command's plan, posted as a frozen WritePlan."""
        try:
            plan = self.bench.next_plan()
        except QcowError as e:
            self.post_message(PlanPreviewed(None, str(e)))
            return
        self.post_message(PlanPreviewed(plan, None if self.bench.replay is not None else "the session is not open"))

    @on(PlanPreviewed)
    def _previewed(self, event: PlanPreviewed) -> None:
        if self.bench.position:
            return  # a step landed since: its plan is shown
        static = self.query_one("#plan", Static)
        title = "step 1, not applied yet (n applies it)"
        if event.plan is None:
            static.update(plan_content(None, 0, 1, title=f"{title}: {event.problem or 'no writes'}"))
            return
        static.update(plan_content(event.plan, self.model.cluster_size, self.model.spc, title=title))

    # ---- check and repair ------------------------------------------------------------------
    def action_check(self) -> None:
        self.run_check()

    def run_check(self) -> None:
        self.engine_job(self._run_check)

    def _run_check(self) -> None:
        generation = self.bench.generation
        try:
            report = self._check()
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        self.post_message(CheckFinished(report, generation=generation))

    def _check(self, *, keep_references: bool = False):
        """check_image of the current image; a large image is checked in a child process (see offload)."""
        from ..engine.check.checker import check_image
        from .offload import LARGE_CLUSTERS, check_in_child

        what = "checking"
        self.post_message(Progress(what, 0.0))

        @throttled
        def progress(done: int, total: int) -> None:
            self.post_message(Progress(what, done / max(1, total)))

        try:
            if self.model.nclusters > LARGE_CLUSTERS or self.check_in_child:
                report = check_in_child(self.chain.top.path, progress, keep_references=keep_references)
            else:
                report = check_image(self.chain.top, progress=progress)
        finally:
            self.post_message(Progress(what, None))
        return report

    @on(CheckFinished)
    def _checked(self, event: CheckFinished) -> None:
        r = event.report
        self.report = r
        self.report_generation = event.generation
        self.query_one(FindingsView).set_findings(r.findings)
        self.update_check_tab()
        tabs = self.query_one(TabbedContent)
        if not event.quiet:
            tabs.active = "tab-check"
            self.notify("check: " + check_summary(r), severity="error" if r.exit_code in (1, 2) else "information")
            findings = self.query_one(FindingsView)
            if findings.findings and findings.findings[0].severity is Severity.ERROR:
                self._finding(FindingsView.FindingSelected(findings.findings[0]))

    @property
    def check_stale(self) -> bool:
        return self.report is not None and self.report_generation != self.bench.generation

    def update_check_tab(self) -> None:
        """The check tab's title and first line: the counts, and whether the image changed since."""
        r = self.report
        tab = self.query_one(TabbedContent).get_tab("tab-check")
        status = self.query_one("#check-status", Static)
        if r is None:
            tab.label = "check"
            status.update(Content.styled("not checked yet: c checks the image (as qemu-img check does)",
                                         "$text-muted"))
            return
        stale = self.check_stale
        tab.label = f"check ({len(r.findings)}{', stale' if stale else ''})"
        clean = not r.findings and r.exit_code == 0
        line = Content.styled("No errors were found on the image." if clean else check_summary(r) + ".",
                              "$qd-data" if clean else "bold")
        if stale:
            line = Content.assemble(("stale: the image changed since this check (c checks again). ", "bold $qd-warning"),
                                    line)
        status.update(line)

    @on(FindingsView.FindingSelected)
    def _finding(self, event: FindingsView.FindingSelected) -> None:
        f = event.finding
        self.set_status(f"{f.severity.value}: {f.message}  {f.place()}")
        if f.guest_offset is not None and f.guest_offset < self.chain.size and f.snapshot is None:
            if self.host_mode:
                self.set_host_mode(False)
            if self.snap_model is not None:
                self.close_snapshot()
            sc = f.subclusters[0] if f.subclusters else None
            self.cluster_map.select(f.guest_offset // self.model.cluster_size, sc)

    def action_repair(self) -> None:
        if self.snap_model is not None or self.host_mode:
            self.notify("repairs are made in the active image's map (S / h return to it)", severity="warning")
            return
        self.prepare_repair(self.cluster_map.cursor)

    def prepare_repair(self, cluster: int) -> None:
        self.engine_job(self._prepare_repair, cluster)

    def _prepare_repair(self, cluster: int) -> None:
        """Open the replay (repairs are written to it), check, then ask the screen for a plan."""
        self._open_replay()
        if self.bench.replay is None:
            return
        try:
            report = self._check(keep_references=True)
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        per = self.chain.top.header.l2_entries
        entry = divmod(cluster, per)
        mine = self.bench.entry_findings(report, *entry)
        self.post_message(CheckFinished(report, quiet=True, generation=self.bench.generation))
        self.post_message(RepairReady(report, [entry] if mine else None,
                                      f"cluster {cluster} (L1 {entry[0]}, L2 {entry[1]})"))

    @on(RepairReady)
    def _repair_ready(self, event: RepairReady) -> None:
        from .repair_screen import RepairScreen

        if not [f for f in event.report.findings if f.severity is not Severity.INFO]:
            self.notify("check found nothing to repair")
            return
        self.push_screen(RepairScreen(event.report, event.entries, event.where, self.plan_repair), self.apply_repair)

    def plan_repair(self, screen, report, policy, entries) -> None:
        """The repair screen asks for a plan: made by an engine job (it reads the image), posted back."""
        self.engine_job(self._plan_repair, screen, report, policy, entries)

    def _plan_repair(self, screen, report, policy, entries) -> None:
        from ..engine.check.repair import plan_repair

        try:
            plan = plan_repair(self.chain, report, policy=policy, entries=entries)
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        screen.post_message(RepairPlanned(plan, policy, entries))

    def apply_repair(self, plan) -> None:
        if plan is not None:
            self.write_repair(plan)

    def write_repair(self, plan) -> None:
        self.engine_job(self._write_repair, plan)

    def _write_repair(self, plan) -> None:
        try:
            self.bench.apply_repair(plan)
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        self.post_message(RepairApplied(plan))
        generation = self.bench.generation
        self.post_message(CheckFinished(self._check(), quiet=True, generation=generation))

    def action_undo_repair(self) -> None:
        if not self.bench.actions or not isinstance(self.bench.actions[-1], RepairAction):
            self.notify("the newest change is not a repair (p undoes steps)", severity="warning")
            return
        self.move(-1)

    @on(RepairApplied)
    def _repaired(self, event: RepairApplied) -> None:
        self.steps_shown += event.undone  # an undo (p) that took back a repair
        self.image_changed()
        self.query_one(Timeline).set_position(self.bench.position)
        n = len(event.plan.items)
        self.notify(f"repair undone ({n} item(s))" if event.undone else
                    f"repair applied: {n} item(s), journaled — u or p undoes it")


    # ---- quit and save: unsaved work is never thrown away without a word -----------------------
    async def action_quit(self) -> None:
        if isinstance(self.screen, QuitScreen):
            return
        self.engine_job(self._ask_quit)  # after the steps already asked for (n n q counts both)

    def _ask_quit(self) -> None:
        self.post_message(QuitAsked(self.bench.unsaved_changes))

    @on(QuitAsked)
    def _quit_asked(self, event: QuitAsked) -> None:
        if not event.unsaved:
            self.exit()
            return
        if not isinstance(self.screen, QuitScreen):
            self.push_screen(QuitScreen(event.unsaved, self.image_path), self._quit_answer)

    def _quit_answer(self, answer: str | None) -> None:
        if answer == "discard":
            self.exit()
        elif answer == "save":
            self.ask_save(then_quit=True)

    def action_save_as(self) -> None:
        if self.bench.write:
            self.notify("--write: the steps and repairs are in the image itself (p undoes them)")
            return
        if self.bench.replay is None or not self.bench.actions:
            self.notify("nothing to save yet: no step or repair was made")
            return
        self.ask_save(then_quit=False)

    def ask_save(self, *, then_quit: bool, value: str | None = None, error: str | None = None) -> None:
        def check(path: str) -> str | None:
            try:
                self.bench.check_save_path(path)
            except QcowError as e:
                return str(e)
            return None

        screen = PathScreen("save as a new image" + (", then quit" if then_quit else ""),
                            "path of the new image", value=value or self.bench.default_save_path(),
                            forms="a new file (never overwritten): the image with every step and repair",
                            accept=check)
        self.push_screen(screen, lambda path: self.save_as(path, then_quit=then_quit) if path else None)
        if error:
            self.call_after_refresh(screen.show_error, error)

    def save_as(self, path: str, *, then_quit: bool = False) -> None:
        """Copy the scratch copy to `path` in an engine job (after every change asked for before)."""
        self.engine_job(self._save_as, path, then_quit)

    def _save_as(self, path: str, then_quit: bool) -> None:
        try:
            done = self.bench.save_as(path)
        except QcowError as e:
            self.post_message(Saved(path, str(e), then_quit))
            return
        self.post_message(Saved(done, None, then_quit))

    @on(Saved)
    def _saved(self, event: Saved) -> None:
        if event.error:
            self.ask_save(then_quit=event.then_quit, value=event.path, error=event.error)
            return
        self.show_session_state()
        if event.then_quit:
            self.exit(message=f"qdebug: saved as {event.path}")
            return
        self.notify(f"saved as {event.path}")

    # ---- host view --------------------------------------------------------------------------
    def action_toggle_host(self) -> None:
        self.set_host_mode(not self.host_mode)

    def set_host_mode(self, on: bool) -> None:
        host = self.query_one(HostView)
        cmap = self.cluster_map
        host.display = on
        cmap.display = not on
        (host if on else cmap).focus()
        if on and (self.host_layout is None or self.host_generation != self.bench.generation):
            host.border_subtitle = "classifying every host cluster…"
            self.engine_job(self._host_layout)
        self.show_selection()

    def _host_layout(self) -> None:
        """Engine job: the host layout of the image file as it is now (reads the whole file)."""
        from ..engine.forensics.layout import host_layout

        generation = self.bench.generation
        what = "classifying host clusters"
        self.post_message(Progress(what, 0.0))
        try:
            layout = host_layout(self.chain.top)
        except QcowError as e:
            self.post_message(HostLayoutReady(None, generation, str(e)))
            return
        finally:
            self.post_message(Progress(what, None))
        self.post_message(HostLayoutReady(layout, generation))

    @on(HostLayoutReady)
    def _host_ready(self, event: HostLayoutReady) -> None:
        host = self.query_one(HostView)
        if event.layout is None:
            host.border_subtitle = ""
            self.notify(f"host view: {event.error}", severity="error")
            return
        self.host_layout, self.host_generation = event.layout, event.generation
        cursor = host.cursor
        host.set_layout(event.layout)
        host.move_to(self.host_pending if self.host_pending is not None else cursor)
        self.host_pending = None
        s = event.layout.summary()
        problems = ", ".join(f"{n} {k}" for k, n in s.problems.items())
        host.border_subtitle = f"{event.layout.nb_clusters} host clusters" + (f"; problems: {problems}" if problems else "")
        if self.host_mode:
            self.show_selection()

    def show_host_selection(self) -> None:
        host = self.query_one(HostView)
        if host.host_layout is None:
            return
        self.query_one(Inspector).show_host(host.host_layout, host.cursor, host.guest_clusters(host.cursor))

    def next_problem(self) -> None:
        host = self.query_one(HostView)
        if host.host_layout is None:
            return
        nxt = host.next_problem(host.cursor)
        if nxt is None:
            self.notify(f"no overlapped or leaked host cluster after {host.cursor}")
            return
        host.move_to(nxt, center=True)

    def action_to_owner(self) -> None:
        """Enter in the host view: to the guest cluster the host cluster holds (the next one on each
        Enter when it holds several), in the active image's map."""
        host = self.query_one(HostView)
        lay = host.host_layout
        if lay is None:
            return
        index = host.cursor
        owners = host.guest_clusters(index)
        if not owners:
            what = host.describe(index)
            self.notify(f"host cluster {index} ({lay.kind_of(index)}) holds no guest data of the active image"
                        + (f": {what}" if what else ""))
            return
        last, k = self._owner_turn
        k = (k + 1) % len(owners) if last == index else 0
        self._owner_turn = (index, k)
        if self.snap_model is not None:
            self.close_snapshot()
        self.set_host_mode(False)
        self.cluster_map.select(owners[k], 0)
        if len(owners) > 1:
            self.notify(f"host cluster {index} holds guest clusters {', '.join(map(str, owners))}: "
                        f"this is {k + 1} of {len(owners)} (Enter, then Enter again: the next)")

    def action_to_host(self) -> None:
        """Enter in the guest view: to the host cluster holding the selected cluster's data."""
        model = self.map_model
        info = model.entry(self.cluster_map.cursor)
        if info.host_offset is None:
            self.notify(f"cluster {info.cluster} has no host cluster in this image")
            return
        index = info.host_offset // model.cluster_size
        host = self.query_one(HostView)
        if self.host_layout is not None and self.host_generation == self.bench.generation:
            if index >= host.row_count:
                self.notify(f"cluster {info.cluster}'s host offset 0x{info.host_offset:x} is past the end of the file",
                            severity="warning")
                return
            self.set_host_mode(True)
            host.move_to(index, center=True)
        else:
            self.host_pending = index
            self.set_host_mode(True)

    # ---- internal snapshots -----------------------------------------------------------------
    def action_snapshots(self) -> None:
        self.engine_job(self._list_snapshots)

    def _list_snapshots(self) -> None:
        try:
            snaps = self.chain.top.snapshots()
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        self.post_message(SnapshotsListed([(s.id, snapshot_label(s)) for s in snaps]))

    @on(SnapshotsListed)
    def _snapshots_listed(self, event: SnapshotsListed) -> None:
        if not event.snapshots:
            self.notify(f"{os.path.basename(self.image_path)} has no internal snapshots")
            return
        self.push_screen(SnapshotScreen(event.snapshots, self.snap_id), self.show_snapshot)

    def show_snapshot(self, snapshot_id: str | None) -> None:
        if snapshot_id is None:
            return
        if snapshot_id == "":
            self.close_snapshot()
            return
        self.engine_job(self._open_snapshot, snapshot_id)

    def _open_snapshot(self, snapshot_id: str) -> None:
        """Engine job: the snapshot as a read-only image (its L1 table, its virtual size)."""
        from ..engine.read.snapshotview import open_snapshot

        try:
            img = open_snapshot(self.chain.top.path, snapshot_id)
        except QcowError as e:
            self.post_message(SnapshotOpened(snapshot_id, None, str(e)))
            return
        self.post_message(SnapshotOpened(snapshot_id, img))

    @on(SnapshotOpened)
    def _snapshot_opened(self, event: SnapshotOpened) -> None:
        if event.image is None:
            self.notify(event.error or "cannot open the snapshot", severity="error")
            return
        self.close_snapshot(show=False)
        self.snap_id = event.snapshot_id
        self.snap_model = ImageModel(Chain([event.image, *self.chain.layers[1:]]), self.model.io_lock)
        if self.host_mode:
            self.set_host_mode(False)
        cmap = self.cluster_map
        cmap.set_model(self.snap_model)
        cmap.border_title = f"snapshot {snapshot_label(event.image.snapshot)} (read-only)"
        cmap.select(min(cmap.cursor, self.snap_model.nclusters - 1))
        self.fit_map()
        self.show_selection()

    def close_snapshot(self, *, show: bool = True) -> None:
        """Back to the active image's map (the snapshot's file handle closed, not the backing files)."""
        snap = self.snap_model
        if snap is None:
            return
        self.snap_model, self.snap_id = None, None
        if show:
            try:
                cmap = self.cluster_map
            except NoMatches:
                cmap = None
            if cmap is not None:
                cmap.set_model(self.model)
                cmap.border_title = "cluster map"
                cmap.select(min(cmap.cursor, self.model.nclusters - 1))
        with self.model.io_lock.writing():
            snap.chain.top.close()


def snapshot_label(s) -> str:
    """How a snapshot is named on screen: its ID and name, as qemu-img snapshot -l lists them."""
    return f"{s.id} {s.name!r}" if s.name else s.id


def check_summary(r) -> str:
    if not r.exit_code and not r.findings:
        return "no errors were found on the image"
    return f"{r.corruptions} corruption(s), {r.leaks} leak(s), {r.check_errors} check error(s)"


def throttled(fn, interval: float = 0.1):
    """At most one call per `interval` seconds: a progress bar needs no more, and each message costs
    the UI thread a repaint."""
    last = [0.0]

    def call(*args) -> None:
        now = time.monotonic()
        if now - last[0] >= interval:
            last[0] = now
            fn(*args)
    return call


def step_changes(record: StepRecord | None, sign: int) -> list | None:
    if record is None:
        return None
    return [(c, sign) for c in record.plan.clusters]


def make_app(image: str, *, trace: str | None = None, write: bool = False, **kw) -> QDebugApp:
    return QDebugApp(image, trace=trace, write=write, **kw)
