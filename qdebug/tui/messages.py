"""Messages the app posts when engine state changes: the protocol tests assert on."""

from __future__ import annotations

from textual.message import Message


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
    """The session moved to `position` (0..N); `record` is the StepRecord of the last applied step."""

    def __init__(self, position: int, record, changes: list | None = None) -> None:
        super().__init__()
        self.position = position
        self.record = record
        # (ClusterChange, +1 applied / -1 undone) of a single step; None after a seek or a repair
        self.changes = changes


class CheckFinished(Message):
    def __init__(self, report, quiet: bool = False) -> None:
        super().__init__()
        self.report = report
        self.quiet = quiet


class RepairReady(Message):
    """A fresh CheckReport to plan a repair from; `entries` is the selected (L1, L2) entry or None (all)."""

    def __init__(self, report, entries, where: str) -> None:
        super().__init__()
        self.report = report
        self.entries = entries
        self.where = where


class RepairApplied(Message):
    def __init__(self, plan, undone: bool = False) -> None:
        super().__init__()
        self.plan = plan
        self.undone = undone


class Jumped(Message):
    """A search (next invalid / allocated / zero) ended at `cluster` (None: nothing found)."""

    def __init__(self, what: str, cluster: int | None) -> None:
        super().__init__()
        self.what = what
        self.cluster = cluster
