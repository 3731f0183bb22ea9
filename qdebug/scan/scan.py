"""A scan: files found (a background thread walks, so totals grow while checks run), handed to a
runner in small chunks with a bounded number in flight, outcomes streamed back in completion
order, recorded in the resume state and added up.

`Scan.run()` yields each new `Outcome` as it arrives and `None` about every `tick` seconds while
waiting (so a progress display stays alive during a long check). `stop()` (Ctrl-C) hands out no
more work and withdraws what has not started; the checks already running finish and are
yielded, then `run()` ends.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from .discover import Candidate, Unusable
from .runners import WorkerLost
from .state import ScanState
from .tally import ScanSummary, Tally
from .task import ERROR, Outcome, check_chunk, error_record

CHUNK_FILES = 8  # images per task at most ...
CHUNK_BYTES = 256 << 20  # ... and this much file (apparent size) at most: a big image goes alone
IN_FLIGHT_PER_WORKER = 4


@dataclass(frozen=True)
class Progress:
    """Files and bytes examined so far, of those found so far (`walking`: totals still grow)."""

    files_done: int
    files_found: int
    bytes_done: int
    bytes_found: int
    walking: bool
    elapsed: float


class _Walker(threading.Thread):
    """Runs discovery ahead of the checks into a bounded queue; counts what it found."""

    def __init__(self, sources: Iterable[Candidate | Unusable], limit: int = 100_000):
        super().__init__(name="qdebug-scan-walk", daemon=True)
        self.sources = sources
        self.q: queue.Queue = queue.Queue(limit)
        self.files = self.bytes = 0
        self.done = False
        self.failure: BaseException | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        try:
            for item in self.sources:
                if self._stop.is_set():
                    break
                self.files += 1
                if isinstance(item, Candidate):
                    self.bytes += item.size
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the scan, which reports it
            self.failure = e
        finally:
            self.done = True

    def stop(self) -> None:
        self._stop.set()


class Scan:
    def __init__(self, sources: Iterable[Candidate | Unusable], runner, *, force_share: bool = False,
                 signatures: bool = True, state: ScanState | None = None, tick: float = 0.25):
        self.runner = runner
        self.force_share = force_share
        self.signatures = signatures
        self.state = state
        self.tick = tick
        self.tally = Tally()
        self._walker = _Walker(sources)
        self._stopping = False
        self._held: Candidate | None = None  # taken from the queue but left for the next chunk
        # images whose worker died under them (with the others it was running): each is tried
        # again alone, nothing else in flight, so only the one that kills a worker fails
        self._suspects: deque[Candidate] = deque()
        self._start = time.monotonic()
        self.files_done = self.bytes_done = 0

    # ---- what the command line reads ----------------------------------------------------------
    def progress(self) -> Progress:
        w = self._walker
        return Progress(self.files_done, w.files, self.bytes_done, w.bytes, not w.done,
                        time.monotonic() - self._start)

    def summary(self) -> ScanSummary:
        return self.tally.summary(self.runner.workers)

    def stop(self) -> None:
        """No more work is handed out; what runs finishes (Ctrl-C)."""
        self._stopping = True
        self.tally.interrupted = True
        self._walker.stop()

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> Iterator[Outcome | None]:
        self._walker.start()
        inflight: dict = {}  # handle -> (candidates, attempt)
        limit = self.runner.workers * IN_FLIGHT_PER_WORKER
        cancelled = False
        try:
            while True:
                if self._suspects:
                    if not inflight and not self._stopping:
                        c = self._suspects.popleft()
                        inflight[self.runner.submit(check_chunk, [(c.path, c.explicit)], self.force_share,
                                                    self.signatures)] = ([c], 1)
                else:
                    while not self._stopping and len(inflight) < limit:
                        chunk, finished = self._next_chunk()
                        yield from finished
                        if chunk is None:
                            break
                        inflight[self.runner.submit(check_chunk, [(c.path, c.explicit) for c in chunk],
                                                    self.force_share, self.signatures)] = (chunk, 0)
                if not inflight:
                    if self._stopping or (self._walker.done and self._walker.q.empty() and self._held is None
                                          and not self._suspects):
                        break
                    yield None  # the walk is slower than the checks: wait for it
                    time.sleep(0.01)
                    continue
                if self._stopping and not cancelled:  # work not started yet is dropped (resume redoes it)
                    self.runner.cancel(list(inflight))
                    cancelled = True
                done, _ = self.runner.wait(list(inflight), self.tick)
                if not done:
                    yield None
                for handle in done:
                    chunk, attempt = inflight.pop(handle)
                    yield from self._finish(handle, chunk, attempt)
        finally:
            if inflight:  # an exception or a second Ctrl-C: nothing more to wait for
                self.runner.cancel(list(inflight))
            self._walker.stop()
            if self.state is not None:
                self.state.close()
        if self._walker.failure is not None:
            raise self._walker.failure

    def _next_chunk(self) -> tuple[list[Candidate] | None, list[Outcome]]:
        """Up to CHUNK_FILES (times the runner's `chunk_scale`) candidates that are queued now (at least one, waiting briefly for the
        walk); outcomes of files that need no check (unusable, finished in the resume state)."""
        chunk: list[Candidate] = []
        size = 0
        finished: list[Outcome] = []
        deadline = time.monotonic() + self.tick
        most = CHUNK_FILES * getattr(self.runner, "chunk_scale", 1)
        while len(chunk) < most:
            if self._held is not None:
                item, self._held = self._held, None
            else:
                try:
                    block = not chunk and time.monotonic() < deadline
                    item = self._walker.q.get(timeout=0.05) if block else self._walker.q.get_nowait()
                except queue.Empty:
                    if chunk or (self._walker.done and self._walker.q.empty()) or time.monotonic() >= deadline:
                        break
                    continue
            if isinstance(item, Unusable):
                finished.append(self._account(Outcome(item.path, ERROR, 1, error=item.error,
                                                      record=error_record(item.path, item.error)), None))
                continue
            if self.state is not None:
                old = self.state.finished(item.key)
                if old is not None:
                    self.tally.add(old, resumed=True)
                    self.files_done += 1
                    self.bytes_done += item.size
                    continue
            if chunk and size + item.size > CHUNK_BYTES:
                self._held = item
                break
            chunk.append(item)
            size += item.size
        return (chunk or None), finished

    def _finish(self, handle, chunk: list[Candidate], attempt: int) -> Iterator[Outcome]:
        if handle.cancelled():
            return
        try:
            outcomes = self.runner.result(handle)
        except WorkerLost as e:
            if attempt == 0:
                self._suspects.extend(chunk)
                return
            outcomes = [Outcome(c.path, ERROR, 1, error=str(e), record=error_record(c.path, str(e)))
                        for c in chunk]
        for c, o in zip(chunk, outcomes):
            yield self._account(o, c)

    def _account(self, o: Outcome, c: Candidate | None) -> Outcome:
        self.tally.add(o)
        self.files_done += 1
        if c is not None:
            self.bytes_done += c.size
            if self.state is not None:
                self.state.record(c.key, o)
        return o
