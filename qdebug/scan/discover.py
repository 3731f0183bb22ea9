"""Which files a scan examines: the paths given (files, or directories walked recursively) and the
lines of a list file. Whether a file is a qcow2 image is decided by its magic, in the worker that
checks it (reading four bytes there spreads that I/O too); here only `stat`.

A file named explicitly always gets a line of output (a result, or an error saying why it cannot be
checked); inside a walked directory only qcow2 images do, other files are counted as skipped.
Symbolic links to files are followed, links to directories are not (no loops, as `find`).
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from typing import IO, Iterable, Iterator


@dataclass(frozen=True)
class Candidate:
    """A file to examine. `key` (absolute path, size, mtime) is what resume state matches."""

    path: str
    size: int
    mtime_ns: int
    explicit: bool  # named by the user (or a list): never skipped silently

    @property
    def key(self) -> tuple[str, int, int]:
        return os.path.abspath(self.path), self.size, self.mtime_ns


@dataclass(frozen=True)
class Unusable:
    """A path that cannot even be looked at (missing, a directory that cannot be listed, ...)."""

    path: str
    error: str


def read_list(stream: IO[str]) -> Iterator[str]:
    """Paths from a list, one per line (blank lines ignored), read lazily."""
    for line in stream:
        path = line.rstrip("\n")
        if path.strip():
            yield path


def open_list(name: str) -> IO[str]:
    return sys.stdin if name == "-" else open(name, encoding="utf-8", errors="surrogateescape")


def discover(paths: Iterable[str]) -> Iterator[Candidate | Unusable]:
    """Every file to examine under `paths`, in order; directories depth-first in name order."""
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            yield Unusable(path, e.strerror or str(e))
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(path)
        else:  # regular files and block devices; anything else is refused by the check itself
            yield Candidate(path, st.st_size, st.st_mtime_ns, explicit=True)


def _walk(top: str) -> Iterator[Candidate | Unusable]:
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield Unusable(top, f"cannot list the directory: {e.strerror or e}")
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(entry.path)
                continue
            st = entry.stat()  # follows a link to a file
        except OSError as e:
            if entry.is_symlink():
                continue  # a dangling link in a walked directory is not an image
            yield Unusable(entry.path, e.strerror or str(e))
            continue
        if stat.S_ISREG(st.st_mode):
            yield Candidate(entry.path, st.st_size, st.st_mtime_ns, explicit=False)
