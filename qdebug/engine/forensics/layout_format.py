"""A `HostLayout` as text or JSON, streamed: lines are built by one template per combination of
(kind, snapshot, guess, single cluster) picked with numpy, and per run only the numbers are
formatted (str.format through map(), as `map --output=json` does); runs with lists of owners
(compressed, overlap) are rare and built one by one."""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from .guess import GUESS_NAMES
from .layout import KIND_NAMES, HostKind, HostLayout

_LINES = 1 << 14  # runs formatted per batch


def _owner_columns(lay: HostLayout, sl: slice):
    r, cs = lay.runs, lay.cluster_size
    kind, n = r.kind[sl], r.count[sl]
    data = kind == HostKind.DATA
    owner = np.where(data, r.owner[sl] * cs, r.owner[sl])
    last = np.where(data, owner + n * cs, owner + n - 1)
    ids = np.array(list(lay.snapshot_ids) + [""], dtype=object)
    snap = ids[r.snapshot[sl]]  # -1 (active) picks the trailing ""
    return (r.start[sl] * cs).tolist(), (n * cs).tolist(), owner.tolist(), last.tolist(), snap.tolist()


def _json_template(kind: int, snap: bool, guess: int, _single: bool) -> str:
    t = '{{{{"start": {{0}}, "length": {{1}}, "kind": "{k}"'.format(k=KIND_NAMES[kind])
    if snap and kind in (HostKind.L1, HostKind.L2, HostKind.DATA):
        t += ', "snapshot": {4}'
    t += {HostKind.DATA: ', "guest-offset": {2}', HostKind.L2: ', "l1-index": {2}',
          HostKind.REFCOUNT_BLOCK: ', "refcount-table-index": {2}', HostKind.BITMAP_TABLE: ', "bitmap": {2}',
          HostKind.BITMAP_DATA: ', "bitmap": {2}'}.get(kind, "")
    if guess:
        t += f', "guess": "{GUESS_NAMES[guess]}"'
    return t + "}}"


def _text_template(kind: int, snap: bool, guess: int, single: bool) -> str:
    what = []
    if kind in (HostKind.L1, HostKind.L2, HostKind.DATA):
        what.append("snapshot {4}" if snap else "active")
    if kind == HostKind.DATA:
        what.append("guest {2:#x}-{3:#x}")
    elif kind == HostKind.L2:
        what.append("L1 index {2}" if single else "L1 index {2}-{3}")
    elif kind == HostKind.REFCOUNT_BLOCK:
        what.append("refcount table index {2}" if single else "refcount table index {2}-{3}")
    elif kind in (HostKind.BITMAP_TABLE, HostKind.BITMAP_DATA):
        what.append("bitmap {2}")
    if guess:
        what.append(f"guess: {GUESS_NAMES[guess]}")
    return ("{0:<#16x}{1:<#16x}" + f"{KIND_NAMES[kind]:<17}" + "  ".join(what)).rstrip()


def _lines(lay: HostLayout, text: bool) -> Iterator[list[str]]:
    r = lay.runs
    make = _text_template if text else _json_template
    cache: dict[int, str] = {}
    for a in range(0, len(r), _LINES):
        sl = slice(a, min(len(r), a + _LINES))
        kind, guess = r.kind[sl].astype(np.int64), r.guess[sl].astype(np.int64)
        key = kind * 4096 + (r.snapshot[sl] >= 0) * 2048 + guess * 2 + (r.count[sl] == 1)
        uniq, inv = np.unique(key, return_inverse=True)
        table = np.array([cache.get(k) or cache.setdefault(k, make(k // 4096, bool(k & 2048), (k & 2047) // 2,
                                                                     bool(k & 1))) for k in uniq.tolist()],
                         dtype=object)
        cols = _owner_columns(lay, sl)
        if not text:
            cols = cols[:4] + ([json.dumps(x) for x in cols[4]],)
        lines = list(map(str.format, table[inv].tolist(), *cols))
        for i in np.flatnonzero((kind == HostKind.COMPRESSED) | (kind == HostKind.OVERLAP)).tolist():
            lines[i] = _owners_line(lay, a + i, text)
        yield lines


def _owners_line(lay: HostLayout, i: int, text: bool) -> str:
    r = lay.runs
    if not text:
        return json.dumps(lay.run_json(i))
    head = f"{int(r.start[i]) * lay.cluster_size:<#16x}{int(r.count[i]) * lay.cluster_size:<#16x}" \
           f"{KIND_NAMES[int(r.kind[i])]:<17}"
    owners = lay.run_json(i)["owners"]
    if int(r.count[i]) == 1 and int(r.kind[i]) == HostKind.OVERLAP:
        return head + " and ".join(o.describe() for o in lay.owners(int(r.start[i])))
    return head + f"{len(owners)} owners"


def iter_json(lay: HostLayout) -> Iterator[str]:
    """`{"filename", "cluster-size", "file-size", "runs": [...], "problems": [...], "summary", ...}`."""
    head = {"filename": lay.path, "cluster-size": lay.cluster_size, "file-size": lay.file_size}
    yield json.dumps(head)[:-1] + ', "runs": ['
    first = True
    for lines in _lines(lay, text=False):
        yield ("" if first else ",\n") + ",\n".join(lines)
        first = False
    yield '],\n"problems": ['
    for j in range(len(lay.problems)):
        yield ("" if j == 0 else ",\n") + json.dumps(lay.problem_json(j))
    tail = {"summary": lay.summary().to_json(), "refcounts-known": lay.refcounts_known, "notes": list(lay.notes)}
    yield "],\n" + json.dumps(tail)[1:] + "\n"


def iter_text(lay: HostLayout) -> Iterator[str]:
    """One line per run, then the problems (text without the summary, which the CLI prints)."""
    for lines in _lines(lay, text=True):
        yield "\n".join(lines) + "\n"
