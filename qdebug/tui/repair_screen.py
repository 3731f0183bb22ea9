"""The repair modal: the findings of the selected entry (or all), a policy, and the engine's plan.

Every policy change asks for a plan again: the app makes it in an engine job (planning reads the
image, never on the UI thread) and posts it back (`RepairPlanned`). What the screen shows is the
plan's own items: the finding, the action, the byte patches, and each guest range's before/after
preview. Apply dismisses with the plan; the app writes it through the replay's journal.
"""

from __future__ import annotations

from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Label, RadioButton, RadioSet, Static

from ..engine.check.repair import RepairPlan, RepairPolicy
from .messages import RepairPlanned

POLICIES = list(RepairPolicy)


def plan_content(plan: RepairPlan) -> Content:
    lines: list[Content] = []
    for item in plan.items:
        f = item.finding
        if f is not None:
            lines.append(Content.assemble(("● ", "$qd-error"), (f.message, "bold")))
            if f.place():
                lines.append(Content.styled(f"  {f.place()}", "$text-muted"))
        lines.append(Content.assemble(("  repair: ", "$text-muted"), (item.action, "$qd-data")))
        for p in item.patches[:6]:
            lines.append(Content.styled(f"    write {len(p.data)} bytes at 0x{p.offset:x} ({p.what}): "
                                        f"{p.data[:16].hex(' ')}", "$text-muted"))
        if len(item.patches) > 6:
            lines.append(Content.styled(f"    … and {len(item.patches) - 6} more writes", "$text-muted"))
        for c in item.changes:
            lines.append(Content.assemble(f"    guest 0x{c.start:x}+0x{c.length:x}"))
            lines.append(Content.assemble(("      before ", "$text-muted"), (c.before, "$qd-error")))
            lines.append(Content.assemble(("      after  ", "$text-muted"), (c.after, "$qd-data")))
        lines.append(Content(""))
    for u in plan.unsupported:
        lines.append(Content.styled(f"not repaired: {u}", "$qd-warning"))
    if not plan.items:
        lines.append(Content.styled("nothing to repair here", "$text-muted"))
    return Content("\n").join(lines)


def policies_content(chosen: RepairPolicy) -> Content:
    """Every policy with its effect in words, the chosen one marked."""
    lines = []
    for p in POLICIES:
        mark, st = ("▶ ", "bold") if p is chosen else ("  ", "$text-muted")
        lines.append(Content.assemble((mark + p.value, st + (" $text-accent" if p is chosen else "")),
                                      (f": {p.effect}", st)))
    return Content("\n").join(lines)


class RepairScreen(ModalScreen[RepairPlan | None]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel", id="repair.cancel"),
        Binding("enter", "apply", "Apply", id="repair.apply", priority=True),
        Binding("a", "scope", "All / selected", id="repair.scope"),
        Binding("up,left", "policy(-1)", "Previous policy", id="repair.policy_prev", priority=True),
        Binding("down,right", "policy(1)", "Next policy", id="repair.policy_next", priority=True),
    ]

    def __init__(self, report, entries: list[tuple[int, int]] | None, where: str,
                 request_plan: Callable[["RepairScreen", object, str, list | None], None]):
        super().__init__()
        self.report = report
        self.request_plan = request_plan
        self.selected_entries = entries
        self.where = where
        self.all = entries is None
        self.policy = POLICIES[0]
        self.plan: RepairPlan | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="repair-box") as box:
            box.border_title = "repair"
            box.border_subtitle = "↑↓ policy · enter apply · a all/selected · escape cancel"
            yield Label("", id="repair-scope")
            with Horizontal(id="repair-top"):
                with RadioSet(id="repair-policy"):
                    for i, p in enumerate(POLICIES):
                        yield RadioButton(p.value, value=i == 0, id=f"policy-{p.value}")
                yield Static("", id="repair-policy-help")
            with VerticalScroll(id="repair-plan-scroll"):
                yield Static(id="repair-plan")
            with Horizontal(id="repair-buttons"):
                yield Button("Apply (journaled, undo with u)", variant="warning", id="repair-apply")
                yield Button("Cancel", id="repair-cancel")

    def on_mount(self) -> None:
        self.query_one("#repair-policy-help", Static).update(policies_content(self.policy))
        self.replan()

    def action_policy(self, delta: int) -> None:
        """Arrow keys: the next or previous policy (planned again)."""
        nxt = POLICIES[(POLICIES.index(self.policy) + delta) % len(POLICIES)]
        self.query_one(f"#policy-{nxt.value}", RadioButton).value = True  # RadioSet.Changed replans

    def replan(self) -> None:
        """Ask for the plan of the current policy and scope; the view updates when it arrives."""
        self.plan = None
        self.query_one("#repair-apply", Button).disabled = True
        self.query_one("#repair-plan", Static).update(Content.styled("planning…", "$text-muted"))
        self.request_plan(self, self.report, self.policy, None if self.all else self.selected_entries)

    def on_repair_planned(self, event: RepairPlanned) -> None:
        if event.policy != self.policy or event.entries != (None if self.all else self.selected_entries):
            return  # an answer to an earlier choice
        self.plan = event.plan
        scope = "all findings" if self.all or self.selected_entries is None else self.where
        self.query_one("#repair-scope", Label).update(
            Content.assemble(("scope: ", "$text-muted"), (scope, "bold"),
                             ("   policy: ", "$text-muted"), (self.policy.value, "bold")))
        self.query_one("#repair-policy-help", Static).update(policies_content(self.policy))
        self.query_one("#repair-plan", Static).update(plan_content(self.plan))
        self.query_one("#repair-apply", Button).disabled = not self.plan.items

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        self.policy = POLICIES[event.index]
        self.query_one("#repair-policy-help", Static).update(policies_content(self.policy))
        self.replan()

    def action_scope(self) -> None:
        if self.selected_entries is not None:
            self.all = not self.all
            self.replan()

    def action_apply(self) -> None:
        if self.plan is not None and self.plan.items:
            self.dismiss(self.plan)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "repair-apply":
            self.action_apply()
        else:
            self.dismiss(None)
