"""The user's keymap file: `binding-id = keys` lines (`?` in the app lists the ids).

Textual ignores a keymap entry whose id no binding has, so a typo would silently do nothing: every
id is checked against the bindings qdebug declares, and an unknown one is an error naming the line.
"""

from __future__ import annotations

import os

from ..engine.errors import QcowError


def binding_ids() -> frozenset[str]:
    """Every binding id of the app, its views and its screens."""
    from .app import QDebugApp
    from .cluster_map import ClusterMap
    from .host_view import HostView
    from .lists import FindingsView, Timeline
    from .repair_screen import RepairScreen
    from .rows import RowView
    from .screens import GotoScreen, HelpScreen, PathScreen, QuitScreen, SnapshotScreen

    owners = (QDebugApp, ClusterMap, HostView, FindingsView, Timeline, RowView, RepairScreen, GotoScreen,
              HelpScreen, PathScreen, QuitScreen, SnapshotScreen)
    return frozenset(b.id for cls in owners for b in cls.BINDINGS if getattr(b, "id", None))


def parse_keymap(lines, path: str) -> dict[str, str]:
    """`binding-id = keys` lines (`#` starts a comment) as Textual's keymap; QcowError names the
    first bad line: not `id = keys`, or an id no binding has."""
    known = binding_ids()
    keymap: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        bid, sep, keys = line.partition("=")
        bid, keys = bid.strip(), keys.strip()
        if not sep or not bid or not keys:
            raise QcowError(f"{path}:{n}: expected 'binding-id = keys'")
        if bid not in known:
            raise QcowError(f"{path}:{n}: unknown binding id {bid!r} (? in the app lists every id)")
        keymap[bid] = keys
    return keymap


def load_keymap(path: str | None) -> dict[str, str] | None:
    """The keymap file `path` (default: $QDEBUG_KEYMAP), None when there is none."""
    path = path or os.environ.get("QDEBUG_KEYMAP")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return parse_keymap(f, path)
    except OSError as e:
        raise QcowError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise QcowError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
