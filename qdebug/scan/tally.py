"""The running totals of a scan and the frozen summary the command line prints."""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

from .task import CHECKED, ERROR, SKIPPED, Outcome

VERDICTS = {0: "clean", 3: "leaks", 2: "corrupt", 1: "check failed"}
KEEP = 10  # worst images and errors listed by name


@dataclass(frozen=True)
class ScanSummary:
    """What a scan found, so far (`interrupted`: it was stopped before the end)."""

    examined: int  # files looked at, skipped ones included
    images: int  # checked
    by_verdict: tuple[tuple[str, int], ...]  # (verdict, images), worst first
    leaked_bytes: int
    errors: int  # files that could not be checked
    first_errors: tuple[tuple[str, str], ...]  # (path, why)
    skipped: int  # walked files that are not qcow2 images
    worst: tuple[Outcome, ...]  # the worst images, worst first
    signatures: tuple[tuple[str, int, str], ...]  # (signature, images, first image)
    resumed: int  # outcomes taken from the resume state
    workers: int
    worker_peak_rss: int  # the largest peak RSS a worker reported, bytes
    worker_cpu: float  # CPU seconds of all the workers (as they reported it last)
    interrupted: bool

    @property
    def exit_code(self) -> int:
        """The worst verdict: 2 corruptions, then 1 (a check failed or an image could not be
        checked), then 3 leaks, 0 clean; 130 for a scan stopped by Ctrl-C."""
        if self.interrupted:
            return 130
        present = {code for code, name in VERDICTS.items() if dict(self.by_verdict).get(name)}
        if self.errors:
            present.add(1)
        for code in (2, 1, 3):
            if code in present:
                return code
        return 0


class Tally:
    """Adds outcomes up; `summary()` is a frozen snapshot."""

    def __init__(self) -> None:
        self.examined = self.images = self.errors = self.skipped = self.resumed = 0
        self.leaked_bytes = 0
        self.verdicts: Counter[int] = Counter()
        self.first_errors: list[tuple[str, str]] = []
        self._worst: list[tuple[tuple[tuple[int, int, int, int], int], Outcome]] = []  # min-heap: the KEEP worst
        self._n = 0
        self.signatures: Counter[str] = Counter()
        self.signature_first: dict[str, str] = {}
        self.peaks: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.interrupted = False

    def add(self, o: Outcome, *, resumed: bool = False) -> None:
        self.examined += 1
        self.resumed += resumed
        if o.worker:
            self.peaks[o.worker] = max(self.peaks.get(o.worker, 0), o.worker_peak_rss)
            self.cpu[o.worker] = max(self.cpu.get(o.worker, 0.0), o.worker_cpu)
        if o.status == SKIPPED:
            self.skipped += 1
            return
        if o.status == ERROR:
            self.errors += 1
            if len(self.first_errors) < KEEP:
                self.first_errors.append((o.filename, o.error or ""))
            return
        assert o.status == CHECKED
        self.images += 1
        self.verdicts[o.exit_code] += 1
        self.leaked_bytes += o.leaked_bytes
        for s in o.signatures:
            self.signatures[s] += 1
            self.signature_first.setdefault(s, o.filename)
        if o.exit_code:
            self._n += 1
            entry = ((o.severity, o.corruptions, o.check_errors, o.leaks), -self._n)
            item = (entry, o)
            if len(self._worst) < KEEP:
                heapq.heappush(self._worst, item)
            elif entry > self._worst[0][0]:
                heapq.heapreplace(self._worst, item)

    def summary(self, workers: int) -> ScanSummary:
        worst = tuple(o for _, o in sorted(self._worst, key=lambda t: t[0], reverse=True))
        by = tuple((VERDICTS[c], self.verdicts[c]) for c in (2, 1, 3, 0) if self.verdicts[c])
        sigs = tuple((s, n, self.signature_first[s]) for s, n in self.signatures.most_common())
        return ScanSummary(self.examined, self.images, by, self.leaked_bytes, self.errors, tuple(self.first_errors),
                           self.skipped, worst, sigs, self.resumed, workers, max(self.peaks.values(), default=0),
                           sum(self.cpu.values()), self.interrupted)
