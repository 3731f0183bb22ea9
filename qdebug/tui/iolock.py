"""Readers-writer guard between engine jobs that change the image file and UI reads of its mmap.

An undo truncates the file; a UI thread reading an mmap page past the new end of the file dies of
SIGBUS (a crash no exception handler can catch). So engine jobs take the exclusive side for as
long as they change the file, and every read of the image by the UI takes the shared side.
Re-entrant for the writer thread (an engine job may read through the model) and for readers.
`held()` says whether the calling thread holds either side (the threading tests assert it).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import wraps


class ImageIOLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: int | None = None
        self._depth = 0
        self._mine = threading.local()  # this thread's nesting depth on the shared side

    def held(self) -> bool:
        """The calling thread holds the lock (either side)."""
        return self._writer == threading.get_ident() or getattr(self._mine, "depth", 0) > 0

    @contextmanager
    def reading(self):
        me = threading.get_ident()
        depth = getattr(self._mine, "depth", 0)
        if self._writer == me or depth:
            self._mine.depth = depth + 1
            try:
                yield
            finally:
                self._mine.depth -= 1
            return
        with self._cond:
            self._cond.wait_for(lambda: self._writer is None)
            self._readers += 1
        self._mine.depth = 1
        try:
            yield
        finally:
            self._mine.depth = 0
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                self._cond.wait_for(lambda: self._writer is None and self._readers == 0)
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                self._cond.notify_all()


def reads_image(method):
    """Run a model method under its lock's shared side."""

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.io_lock.reading():
            return method(self, *args, **kwargs)

    return wrapper
