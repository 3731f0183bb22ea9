"""Messages the app posts when engine state changes: the protocol tests assert on."""

from __future__ import annotations

from textual.message import Message

from ..engine.check.checker import CheckReport
from ..engine.check.repair import RepairPlan
from ..engine.write.plan import WritePlan
from ..engine.write.step import StepRecord


class ImageOpened(Message):
    def __init__(self, path: str, nclusters: int) -> None:
        super().__init__()
        self.path = path
        self.nclusters = nclusters


class CountsReady(Message):
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts


class Progress(Message):
    """Long work advanced: `fraction` in [0, 1], None hides the bar."""

    def __init__(self, what: str, fraction: float | None) -> None:
        super().__init__()
        self.what = what
        self.fraction = fraction


class StepChanged(Message):
    """The replay moved to `position` (0..N); `record` is the last applied step (None at 0).
    `opened`: nothing moved, the session was opened (the chain is now the scratch copy's)."""

    def __init__(self, position: int, record: StepRecord | None, changes: list | None = None,
                 opened: bool = False) -> None:
        super().__init__()
        self.position = position
        self.record = record
        # (ClusterChange, +1 applied / -1 undone) of a single step; None after a seek or a repair
        self.changes = changes
        self.opened = opened


class PlanPreviewed(Message):
    """The next command's plan (None: it writes nothing, or `problem` says why there is none)."""

    def __init__(self, plan: WritePlan | None, problem: str | None) -> None:
        super().__init__()
        self.plan = plan
        self.problem = problem


class CheckFinished(Message):
    """A check of the image as of change `generation` (Workbench.generation)."""

    def __init__(self, report: CheckReport, quiet: bool = False, generation: int = 0) -> None:
        super().__init__()
        self.report = report
        self.quiet = quiet
        self.generation = generation


class RepairReady(Message):
    """A fresh CheckReport to plan a repair from; `entries` is the selected (L1, L2) entry or None (all)."""

    def __init__(self, report: CheckReport, entries: list[tuple[int, int]] | None, where: str) -> None:
        super().__init__()
        self.report = report
        self.entries = entries
        self.where = where


class RepairPlanned(Message):
    """A repair plan for the repair screen, made by an engine job for `policy` and `entries`."""

    def __init__(self, plan: RepairPlan, policy: str, entries: list[tuple[int, int]] | None) -> None:
        super().__init__()
        self.plan = plan
        self.policy = policy
        self.entries = entries


class RepairApplied(Message):
    def __init__(self, plan: RepairPlan, undone: bool = False) -> None:
        super().__init__()
        self.plan = plan
        self.undone = undone


class Jumped(Message):
    """A search (next invalid / allocated / zero) ended at `cluster` (None: nothing found)."""

    def __init__(self, what: str, cluster: int | None) -> None:
        super().__init__()
        self.what = what
        self.cluster = cluster


class QuitAsked(Message):
    """Quit was asked for, after every engine job asked for before it: `unsaved` changes exist."""

    def __init__(self, unsaved: int) -> None:
        super().__init__()
        self.unsaved = unsaved


class Saved(Message):
    """The scratch copy was saved as `path` (or not: `error`); `then_quit` when quitting."""

    def __init__(self, path: str, error: str | None, then_quit: bool) -> None:
        super().__init__()
        self.path = path
        self.error = error
        self.then_quit = then_quit


class HostLayoutReady(Message):
    """The host layout of the image as of change `generation` (None: `error` says why)."""

    def __init__(self, layout, generation: int, error: str | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.generation = generation
        self.error = error


class SnapshotsListed(Message):
    """The image's internal snapshots as (id, label) pairs."""

    def __init__(self, snapshots: list[tuple[str, str]]) -> None:
        super().__init__()
        self.snapshots = snapshots


class SnapshotOpened(Message):
    """A snapshot opened as a read-only image (`image`: a SnapshotImage; None: `error`)."""

    def __init__(self, snapshot_id: str, image, error: str | None = None) -> None:
        super().__init__()
        self.snapshot_id = snapshot_id
        self.image = image
        self.error = error
