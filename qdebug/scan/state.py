"""Resume state: the files a scan has finished, so an interrupted scan of a large fleet goes on
where it stopped. One JSON line per finished file, appended as it finishes (and flushed: a killed
scan loses at most the line being written, which loading ignores). A file is finished for a later
run only while its absolute path, size and mtime are unchanged; its outcome (verdict and counts,
not the findings) is kept so the resumed scan's summary covers the whole fleet."""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields

from ..engine.errors import QcowError
from .task import Outcome

_HEAD = b'{"qdebug-scan-state": 1}\n'
_KEPT = tuple(f.name for f in fields(Outcome) if f.name not in ("record", "worker", "worker_peak_rss", "worker_cpu"))
_SYNC_SECONDS = 2.0


class ScanState:
    """Finished files by (absolute path, size, mtime_ns); `record()` appends one."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict[tuple[str, int, int], Outcome] = {}
        exists = os.path.exists(path)
        if exists:
            self._load()
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise QcowError(f"{path}: cannot write the resume state: {e.strerror}") from None
        if not exists or os.path.getsize(path) == 0:
            self._f.write(_HEAD.decode())
            self._f.flush()
        self._synced = time.monotonic()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise QcowError(f"{self.path}: cannot read the resume state: {e.strerror}") from None
        if not data:
            return
        if not data.startswith(_HEAD):
            raise QcowError(f"{self.path}: not a qdebug scan state file (refusing to append to it)")
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # the last line was cut short by a kill: that file is checked again
            os.truncate(self.path, len(complete))
        lines = complete.decode("utf-8", "surrogateescape").split("\n")[:-1]
        for n, line in enumerate(lines[1:], 2):
            try:
                d = json.loads(line)
                key = (d["path"], int(d["size"]), int(d["mtime-ns"]))
                o = d["outcome"]
                self.done[key] = Outcome(**{k: tuple(o[k]) if k == "signatures" else o[k] for k in _KEPT if k in o})
            except (ValueError, KeyError, TypeError):
                raise QcowError(f"{self.path}:{n}: damaged resume state line") from None

    def finished(self, key: tuple[str, int, int]) -> Outcome | None:
        return self.done.get(key)

    def record(self, key: tuple[str, int, int], outcome: Outcome) -> None:
        o = {k: getattr(outcome, k) for k in _KEPT}
        o["signatures"] = list(outcome.signatures)
        self._f.write(json.dumps({"path": key[0], "size": key[1], "mtime-ns": key[2], "outcome": o}) + "\n")
        self._f.flush()
        if time.monotonic() - self._synced > _SYNC_SECONDS:
            os.fsync(self._f.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
