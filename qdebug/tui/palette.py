"""ctrl+p commands: jumps (typed directly, e.g. `offset 1M`, `cluster 12`, `step 3`) and app actions."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from ..trace.syntax import SyntaxProblem
from .screens import parse_target


class QDebugCommands(Provider):
    def commands(self) -> list[tuple[str, str, object]]:
        app = self.app
        go, nxt = app.action_goto, app.action_next
        return [
            ("Go to offset…", "jump to a guest offset (or type 'offset 0x10000')", partial(go, "offset")),
            ("Go to cluster…", "jump to a guest cluster (or type 'cluster 12')", partial(go, "cluster")),
            ("Go to step…", "replay or undo the trace to a step (or type 'step 3')", partial(go, "step")),
            ("Open trace…", "load a qemu-io command file to step through", app.action_open_trace),
            ("Run check", "qemu-img check of the image, findings in the check tab", app.action_check),
            ("Repair…", "repair the selected invalid entry (or all)", app.action_repair),
            ("Next invalid entry", "jump to the next cluster with an invalid bitmap", partial(nxt, "invalid")),
            ("Next allocated cluster", "jump to the next cluster with a host cluster", partial(nxt, "allocated")),
            ("Next zero cluster", "jump to the next cluster with a zero subcluster", partial(nxt, "zero")),
            ("Save as…", "save the scratch copy (every step and repair) as a new image", app.action_save_as),
            ("Host view / guest view", "one row per host cluster of the file, and back (h)", app.action_toggle_host),
            ("Snapshot map…", "the map of an internal snapshot, read-only (S)", app.action_snapshots),
            ("Show the COW plan", "the plan of the last step (P)", partial(app.action_show_tab, "tab-plan")),
            ("Show the check results", "the findings of the last check (C)", partial(app.action_show_tab, "tab-check")),
            ("Export screenshot", "save an SVG of the screen in the current directory", app.action_export_screenshot),
            ("Switch theme", "pick another colour theme", app.action_change_theme),
        ]

    async def discover(self) -> Hits:
        for name, help_text, callback in self.commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        direct = self._direct(query)
        if direct is not None:
            kind, value = direct
            yield Hit(1.0, f"Go to {kind} {value:#x}" if kind == "offset" else f"Go to {kind} {value}",
                      partial(self.app.goto, direct), help="jump there now")
        matcher = self.matcher(query)
        for name, help_text, callback in self.commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)

    @staticmethod
    def _direct(query: str) -> tuple[str, int] | None:
        q = query.strip().lower()
        if not q or not (q[0].isdigit() or q.split()[0] in ("offset", "cluster", "step", "go")):
            return None
        if q.startswith("go "):
            q = q[3:].removeprefix("to ").strip()
        try:
            return parse_target(q)
        except SyntaxProblem:
            return None
