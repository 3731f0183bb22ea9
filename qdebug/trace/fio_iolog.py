"""fio's iolog (`write_iolog=FILE`), versions 2 and 3, as fio's own reader takes it.

The first line is `fio version 2 iolog` or `fio version 3 iolog`. Then one action a line:
v2 `FILE ACTION [OFFSET LENGTH]`, v3 `TIMESTAMP FILE ACTION [OFFSET LENGTH]` (timestamp in
milliseconds since the start of the run; fio 3.31+ writes v3). File actions (`add`, `open`,
`close`) carry no I/O and are ignored; I/O actions: read, write, trim, sync, datasync,
sync_file_range (v2 also `wait`, a pause: ignored). Several files in one log (a job with
`nrfiles` or `filename=a:b`): the caller picks one.
"""

from __future__ import annotations

import os
from typing import Iterable

from .importers import GuestIO, ImportProblem

_HEADERS = {"fio version 2 iolog": 2, "fio version 3 iolog": 3}
_FILE_ACTIONS = ("add", "open", "close")
_IO = {"read": "read", "write": "write", "trim": "discard", "sync": "flush", "datasync": "flush",
       "sync_file_range": "flush"}


def _number(text: str, what: str, where: str) -> int:
    if not text.isdigit():
        raise ImportProblem(f"{where}: {what} {text!r} is not a number")
    return int(text)


def read_iolog(lines: Iterable[str], source: str, select: str | None) -> tuple[list[GuestIO], str, dict[str, int]]:
    """(requests of one file, that file's name, what was skipped) of an iolog."""
    it = iter(lines)
    first = next(it, "").strip()
    version = _HEADERS.get(first)
    if version is None:
        raise ImportProblem(f"{source}:1: not a fio iolog (expected 'fio version 2 iolog' or 'fio version 3 iolog', "
                            f"got {first[:40]!r}; version 1 logs are not supported, as in fio)")
    per_file: dict[str, list[GuestIO]] = {}
    skipped: dict[str, int] = {}
    for lineno, line in enumerate(it, 2):
        words = line.split()
        if not words:
            continue
        where = f"{source}:{lineno}"
        if version == 3:
            _number(words[0], "timestamp", where)
            words = words[1:]
        if len(words) == 2 and words[1] in _FILE_ACTIONS:
            per_file.setdefault(words[0], [])
            continue
        if len(words) != 4:
            raise ImportProblem(f"{where}: expected {'TIMESTAMP ' if version == 3 else ''}FILE ACTION OFFSET LENGTH, "
                                f"got {line.strip()[:80]!r}")
        name, action, off, length = words
        if action == "wait":
            if version == 3:
                raise ImportProblem(f"{where}: 'wait' is not allowed in a version 3 iolog")
            skipped["waits"] = skipped.get("waits", 0) + 1
            continue
        op = _IO.get(action)
        if op is None:
            raise ImportProblem(f"{where}: unknown fio action {action!r} "
                                "(expected read, write, trim, sync, datasync, add, open or close)")
        offset, nbytes = _number(off, "offset", where), _number(length, "length", where)
        if op == "flush":
            per_file.setdefault(name, []).append(GuestIO("flush", lineno=lineno))
        elif nbytes == 0:
            skipped["zero-length requests"] = skipped.get("zero-length requests", 0) + 1
        else:
            per_file.setdefault(name, []).append(GuestIO(op, offset, nbytes, lineno=lineno))
    name = _pick(per_file, select, source)
    return per_file[name], name, skipped


def _pick(per_file: dict[str, list[GuestIO]], select: str | None, source: str) -> str:
    busy = [n for n, recs in per_file.items() if any(r.op != "flush" for r in recs)]
    if select is not None:
        if select in per_file:
            return select
        by_base = [n for n in per_file if os.path.basename(n) == select]
        if len(by_base) == 1:
            return by_base[0]
        raise ImportProblem(f"{source}: no file {select!r} in the iolog (files: {', '.join(per_file) or 'none'})")
    if not busy:
        raise ImportProblem(f"{source}: the iolog has no read, write or trim")
    if len(busy) > 1:
        raise ImportProblem(f"{source}: the iolog has I/O on {len(busy)} files ({', '.join(busy)}): "
                            "choose one with --file")
    return busy[0]
