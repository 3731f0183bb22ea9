"""The qdebug Textual app: panels that are views over one `Workbench` (chain, Session, CheckReport).

`make_app()` is shared by the CLI and the tests. Engine work runs in thread workers of one
exclusive group ("engine"), so a step, an undo, a check and a repair never overlap; they post
messages (`StepChanged`, `CheckFinished`, `RepairApplied`, `Progress`) and the handlers, on the UI
thread, re-read the engine state into the views. The UI thread itself only reads numpy views of
the mapped image for the visible rows.
"""

from __future__ import annotations

import os
import time

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ScrollableContainer, Vertical
from textual.css.query import NoMatches
from textual.widgets import Footer, Header, ProgressBar, Static, TabbedContent, TabPane

from ..engine.check.checker import Severity
from ..engine.errors import QcowError
from ..engine.write.plan import WritePlan
from ..engine.write.step import StepRecord
from .cluster_map import ClusterMap
from .inspector import Inspector
from .iolock import ImageIOLock
from .lists import FindingsView, Timeline
from .messages import (
    CheckFinished,
    CountsReady,
    ImageOpened,
    Jumped,
    PlanPreviewed,
    Progress,
    RepairApplied,
    RepairPlanned,
    RepairReady,
    StepChanged,
)
from .model import ImageModel
from .palette import QDebugCommands
from .panels import chain_content, counts_content, header_content
from .plan_view import RunningCost, plan_clusters, plan_content
from .rows import RowView
from .screens import GotoScreen, HelpScreen, PathScreen
from .workbench import RepairAction, Serial, StepAction, Workbench


class QDebugApp(App):
    CSS_PATH = "qdebug.tcss"
    TITLE = "qdebug"
    COMMANDS = App.COMMANDS | {QDebugCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]

    BINDINGS = [
        Binding("n,right_square_bracket", "step(1)", "Next step", id="step.next", key_display="n/]"),
        Binding("p,left_square_bracket", "step(-1)", "Prev/undo", id="step.prev", key_display="p/["),
        Binding("g", "goto('offset')", "Go to", id="goto"),
        Binding("i", "next('invalid')", "Next invalid", id="next.invalid"),
        Binding("a", "next('allocated')", "Next allocated", show=False, id="next.allocated"),
        Binding("z", "next('zero')", "Next zero", show=False, id="next.zero"),
        Binding("c", "check", "Check", id="check"),
        Binding("r", "repair", "Repair", id="repair"),
        Binding("u", "undo_repair", "Undo repair", show=False, id="repair.undo"),
        Binding("o", "open_trace", "Open trace", show=False, id="trace.open"),
        Binding("plus,equals_sign", "resize(2)", "Taller step area", show=False, id="layout.grow"),
        Binding("minus", "resize(-2)", "Shorter step area", show=False, id="layout.shrink"),
        Binding("question_mark,f1", "help", "Help", id="help", key_display="?"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, image: str, *, trace: str | None = None, write: bool = False,
                 keymap: dict[str, str] | None = None, counts: bool = True):
        super().__init__()
        self.image_path = image
        self._running_cost = RunningCost()  # the COW plan panel's "so far" line (prefix sums of step costs)
        self.want_counts = counts
        self.bench = Workbench(image, write=write)
        self.serial = Serial()
        if trace:
            self.bench.load_trace(trace)
        self.model = ImageModel(self.bench.chain, ImageIOLock())
        self.counts: dict[str, int] | None = None
        self.report = None
        self.report_version = -1
        self._shown: dict = {}
        self.check_in_child = False  # force the child-process check (tests); large images always use it
        self.steps_shown = 0  # StepChanged messages handled (benchmarks and tests wait on it)
        self.sub_title = os.path.basename(image) + ("  (writing the image)" if write else "  (read-only)")
        if keymap:
            self.set_keymap(keymap)

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
            yield Inspector(id="inspector", classes="panel")
        with Horizontal(id="bottom"):
            yield Timeline(id="timeline", classes="panel")
            with TabbedContent(id="detail"):
                with TabPane("COW plan", id="tab-plan"):
                    with ScrollableContainer(id="plan-scroll"):
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
        self.query_one("#progress").display = False
        self.query_one(Timeline).set_trace(self.bench.commands, self.bench.position)
        self.refresh_panels()
        self.show_plan()
        self.fit_map()
        self.cluster_map.focus()
        self.show_selection()
        self.post_message(ImageOpened(self.image_path, self.model.nclusters))
        if self.want_counts:
            self.set_timer(1.0, self.count_types)  # once the first screen is up: the scan competes for the GIL
        if self.bench.commands:
            self.call_after_refresh(self.engine_job, self._open_replay)  # so step 1's plan can be previewed

    def _open_replay(self) -> None:
        try:
            replaced = self.bench.ensure_replay()
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        if replaced:
            self.post_message(StepChanged(self.bench.position, self.bench.last_record))

    def on_unmount(self) -> None:
        self.bench.close()

    def on_resize(self) -> None:
        self.fit_map()

    def fit_map(self) -> None:
        """The map is as wide as its rows beside the inspector, full width when stacked."""
        cmap = self.cluster_map
        width = "1fr" if self.size.width < 110 else cmap.row_width_needed()
        if str(cmap.styles.width) != str(width):  # a style change is a relayout: only when it differs
            cmap.styles.width = width
        footer = self.query_one(Footer)
        if footer.compact != (self.size.width < 110):
            footer.compact = self.size.width < 110

    def refresh_panels(self) -> None:
        """Header, chain and counts panels (fixed sizes: an update repaints them, no relayout)."""
        for wid, content in (("#header-panel", header_content(self.chain)),
                             ("#chain-panel", chain_content(self.chain, scratch=self.bench.scratch_path)),
                             ("#counts-panel", counts_content(self.counts))):
            key = (content.plain, tuple(content.spans))  # Content's == compares the text only
            if self._shown.get(wid) != key:
                self._shown[wid] = key
                self.query_one(wid, Static).update(content, layout=False)

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

    def image_changed(self, changes: list | None = None, *, show: bool = True) -> None:
        """Engine state changed (a step, an undo, a repair): every view re-reads it. `changes` (the
        step's ClusterChanges) update the subcluster counts in place instead of a whole-image scan."""
        if self.model.chain is not self.chain:
            old = self.model.chain
            self.model.set_chain(self.chain)
            if old is not self.chain:
                self.bench.close_replaced(old)
        else:
            self.model.invalidate()
        self.cluster_map.sync()
        self.refresh_panels()
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
            status.update("")
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

    def action_resize(self, delta: int) -> None:
        """Grow or shrink the step area (timeline and plan) at the expense of the map."""
        bottom = self.query_one("#bottom")
        height = bottom.outer_size.height or 12
        bottom.styles.height = max(4, min(self.size.height - 8, height + delta))

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_rows()))

    def help_rows(self) -> list[tuple[str, str, str]]:
        """(keys, description, binding id) of the app's and the map's bindings, as the keymap has them now."""
        keys: dict[str, list[str]] = {}
        first: dict[str, object] = {}
        for key, active in self.screen.active_bindings.items():  # the keymap is applied here
            b = active.binding
            if b.id and not b.system:
                first.setdefault(b.id, b)
                keys.setdefault(b.id, []).append(self.get_key_display(b.with_key(key, None)))
        order = {b.id: i for i, b in enumerate([*self.BINDINGS, *ClusterMap.BINDINGS, *RowView.BINDINGS])}
        ids = sorted(first, key=lambda bid: order.get(bid, len(order)))
        return [("/".join(keys[bid]), first[bid].description, bid) for bid in ids]

    def action_export_screenshot(self) -> None:
        path = self.save_screenshot()
        self.notify(f"screenshot saved: {path}")

    # ---- trace -----------------------------------------------------------------------------
    def action_open_trace(self) -> None:
        self.push_screen(PathScreen("open trace", "a qemu-io command file"), self.open_trace)

    def open_trace(self, path: str | None) -> None:
        if not path:
            return
        try:
            self.bench.load_trace(path)
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        self.query_one(Timeline).set_trace(self.bench.commands, self.bench.position)
        self.engine_job(self._open_replay)
        self.show_plan()
        self.notify(f"{len(self.bench.commands)} commands from {os.path.basename(path)}: n steps, p undoes")

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
                    self.notify("at the end of the trace")
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
        self.image_changed(event.changes, show=target is None)
        errors = {a.record.index: a.record.error for a in self.bench.actions
                  if isinstance(a, StepAction) and a.record.error}
        self.query_one(Timeline).set_position(event.position, errors)
        self.show_plan()
        rec = event.record
        if rec is not None and rec.error:
            self.notify(f"step {rec.index + 1}: {rec.error}", severity="warning")
        if target is not None:
            self.cluster_map.select(target)  # its SubclusterSelected refreshes the inspector

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
        try:
            report = self._check()
        except QcowError as e:
            self.notify(str(e), severity="error")
            return
        self.post_message(CheckFinished(report))

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
        self.report_version = self.model.version
        self.query_one(FindingsView).set_findings(r.findings)
        tabs = self.query_one(TabbedContent)
        tabs.get_tab("tab-check").label = f"check ({len(r.findings)})"
        if not event.quiet:
            tabs.active = "tab-check"
            summary = (f"check: {r.corruptions} corruption(s), {r.leaks} leak(s), {r.check_errors} check error(s)"
                       if r.exit_code else "check: no errors were found on the image")
            self.notify(summary, severity="error" if r.exit_code in (1, 2) else "information")
            findings = self.query_one(FindingsView)
            if findings.findings and findings.findings[0].severity is Severity.ERROR:
                self._finding(FindingsView.FindingSelected(findings.findings[0]))

    @on(FindingsView.FindingSelected)
    def _finding(self, event: FindingsView.FindingSelected) -> None:
        f = event.finding
        if f.guest_offset is not None and f.guest_offset < self.chain.size:
            sc = f.subclusters[0] if f.subclusters else None
            self.cluster_map.select(f.guest_offset // self.model.cluster_size, sc)

    def action_repair(self) -> None:
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
        self.post_message(CheckFinished(report, quiet=True))
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
        self.post_message(CheckFinished(self._check(), quiet=True))

    def action_undo_repair(self) -> None:
        if not self.bench.actions or not isinstance(self.bench.actions[-1], RepairAction):
            self.notify("the newest change is not a repair (p undoes steps)", severity="warning")
            return
        self.move(-1)

    @on(RepairApplied)
    def _repaired(self, event: RepairApplied) -> None:
        self.steps_shown += event.undone  # an undo (p) that took back a repair
        self.image_changed()
        n = len(event.plan.items)
        self.notify(f"repair undone ({n} item(s))" if event.undone else
                    f"repair applied: {n} item(s), journaled — u or p undoes it")


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
