"""QEMU trace-event logs (`qemu -trace ...`, `qemu-io -T ...`, the `log` backend's text) -> the
guest-facing node's write requests.

QEMU 7.2 traces a guest write where the BlockBackend takes it (`blk_co_pwritev blk B bs N offset
O bytes L flags F`, N being the BlockBackend's root node: the guest-facing node) and again where
each node's generic layer takes it (`bdrv_co_pwritev_part bs N offset O bytes L flags F`, for
the guest-facing node and every node below it: the image file, backing files). Zero writes and
compressed writes are the same events with BDRV_REQ_ZERO_WRITE (0x2, plus MAY_UNMAP 0x4) or
BDRV_REQ_WRITE_COMPRESSED (0x20). The guest-facing node is told apart from the nodes below it by
the BlockBackend: `blk_co_pwritev` names it, and without those events `blk_root_attach` /
`blk_root_detach` say which node is a BlockBackend's root when a `bdrv_co_pwritev_part` runs.
`bdrv_open_common` lines name each node's file, for `--file NAME`.

QEMU 7.2 has no trace event for a discard or a flush at any generic layer (`qemu-io -T '*'`
shows none for `discard` and `flush`), so neither can be imported from its logs. Lines of other
events and other output (qemu-io's own messages) are skipped.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from .importers import GuestIO, ImportProblem

_PREFIX = r"^(?:\d+@\d+\.\d+:)?"
_PTR = r"(0x[0-9a-fA-F]+|\(nil\))"
_BLK = re.compile(_PREFIX + r"blk_co_pwritev blk " + _PTR + r" bs " + _PTR
                  + r" offset (-?\d+) bytes (\d+) flags 0x([0-9a-fA-F]+)\s*$")
_BDRV = re.compile(_PREFIX + r"bdrv_co_pwritev_part bs " + _PTR + r" offset (-?\d+) bytes (\d+) flags 0x([0-9a-fA-F]+)\s*$")
_ATTACH = re.compile(_PREFIX + r"blk_root_(attach|detach) child " + _PTR + r" blk " + _PTR + r" bs " + _PTR + r"\s*$")
_OPEN = re.compile(_PREFIX + r'bdrv_open_common bs ' + _PTR + r' filename "(.*)" flags 0x[0-9a-fA-F]+ format_name "(.*)"\s*$')
_EVENT = re.compile(_PREFIX + r"(blk_co_pwritev|bdrv_co_pwritev_part|blk_root_attach|blk_root_detach|bdrv_open_common) ")

# BdrvRequestFlags (include/block/block-common.h, 7.2)
ZERO_WRITE, MAY_UNMAP, FUA, WRITE_COMPRESSED = 0x2, 0x4, 0x10, 0x20
_IGNORED = FUA | 0x800  # FUA: a cache-mode matter; REGISTERED_BUF: where the buffer lives
_FLAG_NAMES = {0x1: "COPY_ON_READ", 0x40: "WRITE_UNCHANGED", 0x80: "SERIALISING", 0x100: "NO_FALLBACK",
               0x200: "PREFETCH", 0x400: "NO_WAIT"}


def _op(flags: int, where: str) -> tuple[str, bool]:
    rest = flags & ~(ZERO_WRITE | MAY_UNMAP | WRITE_COMPRESSED | _IGNORED)
    if rest:
        names = ", ".join(_FLAG_NAMES.get(b, hex(b)) for b in (1 << i for i in range(32)) if rest & b)
        raise ImportProblem(f"{where}: a write with flags 0x{flags:x} ({names}) has no qemu-io equivalent")
    if flags & ZERO_WRITE:
        if flags & WRITE_COMPRESSED:
            raise ImportProblem(f"{where}: a compressed zero write (flags 0x{flags:x}) has no qemu-io equivalent")
        return "zero", bool(flags & MAY_UNMAP)
    return ("compressed" if flags & WRITE_COMPRESSED else "write"), False


def read_events(lines: Iterable[str], source: str, select: str | None) -> tuple[list[GuestIO], str, dict[str, int]]:
    """(write requests of the guest-facing node, which node, what was skipped) of a trace log."""
    blk_writes: dict[str, list[tuple[int, str, int, int, int]]] = {}  # blk -> (lineno, bs, off, len, flags)
    node_writes: dict[str, list[tuple[int, int, int, int]]] = {}  # bs -> (lineno, off, len, flags)
    roots: dict[str, str] = {}  # blk -> its root node now
    root_writes: dict[str, set[str]] = {}  # bs -> the BlockBackends it was the root of when written
    files: dict[str, tuple[str, str]] = {}  # bs -> (filename, format)
    for lineno, line in enumerate(lines, 1):
        if not _EVENT.match(line):
            continue
        where = f"{source}:{lineno}"
        m = _BDRV.match(line)
        if m:
            bs, off, n, fl = m.groups()
            node_writes.setdefault(bs, []).append((lineno, int(off), int(n), int(fl, 16)))
            for blk, root in roots.items():
                if root == bs:
                    root_writes.setdefault(bs, set()).add(blk)
            continue
        m = _BLK.match(line)
        if m:
            blk, bs, off, n, fl = m.groups()
            blk_writes.setdefault(blk, []).append((lineno, bs, int(off), int(n), int(fl, 16)))
            continue
        m = _ATTACH.match(line)
        if m:
            what, _child, blk, bs = m.groups()
            if what == "attach":
                roots[blk] = bs
            elif roots.get(blk) == bs:
                del roots[blk]
            continue
        m = _OPEN.match(line)
        if m:
            files[m.group(1)] = (m.group(2), m.group(3))
            continue
        raise ImportProblem(f"{where}: malformed {line.split()[0].split(':')[-1]} event: {line.strip()[:100]!r}")

    skipped: dict[str, int] = {}
    if blk_writes:
        blk = _choose(source, select, list(blk_writes), files,
                      {b: {bs for _, bs, *_ in ws} for b, ws in blk_writes.items()}, "BlockBackend")
        events = [(ln, off, n, fl) for ln, _bs, off, n, fl in blk_writes[blk]]
        label = f"BlockBackend {blk} (node {_describe(blk_writes[blk][0][1], files)})"
    else:
        if not node_writes:
            raise ImportProblem(f"{source}: no blk_co_pwritev or bdrv_co_pwritev_part events "
                                "(trace QEMU with -trace blk_co_pwritev, qemu-io with -T blk_co_pwritev)")
        candidates = [bs for bs in node_writes if bs in root_writes]
        if select is None and not candidates:
            raise ImportProblem(f"{source}: cannot tell the guest-facing node: the log has bdrv_co_pwritev_part events "
                                "but no blk_co_pwritev or blk_root_attach ones; trace those too, or name the node "
                                "with --file (its 0x address or its file name)")
        pool = candidates or list(node_writes)
        bs = _choose(source, select, pool, files, {b: {b} for b in pool}, "node")
        events = node_writes[bs]
        label = f"node {_describe(bs, files)}"
    records: list[GuestIO] = []
    for ln, off, n, fl in events:
        if n == 0:
            skipped["zero-length requests"] = skipped.get("zero-length requests", 0) + 1
            continue
        op, unmap = _op(fl, f"{source}:{ln}")
        records.append(GuestIO(op, off, n, unmap, ln))
    return records, label, skipped


def _describe(bs: str, files: dict[str, tuple[str, str]]) -> str:
    name = files.get(bs)
    return f"{bs} {name[0]} ({name[1]})" if name else bs


def _choose(source: str, select: str | None, pool: list[str], files: dict[str, tuple[str, str]],
            nodes: dict[str, set[str]], what: str) -> str:
    """The one candidate (a BlockBackend or node pointer) `select` names, or the only one."""
    if select is None:
        if len(pool) == 1:
            return pool[0]
        listing = "; ".join(f"{p} -> {', '.join(_describe(b, files) for b in sorted(nodes[p]))}" for p in pool)
        raise ImportProblem(f"{source}: writes through {len(pool)} {what}s ({listing}): choose one with --file "
                            "(its address, its node's address or its node's file name)")
    hits = [p for p in pool if select == p or select in nodes[p]]
    if not hits:
        named = {bs for bs, (fname, _fmt) in files.items() if select in (fname, os.path.basename(fname))}
        hits = [p for p in pool if nodes[p] & named]
        if len(hits) > 1:  # a format node and its protocol node share the file name: the format node
            hits = [p for p in hits if any(files.get(b, ("", ""))[1] != "file" for b in nodes[p])]
    if len(hits) != 1:
        raise ImportProblem(f"{source}: --file {select!r} names {len(hits)} of the {what}s that write "
                            f"({', '.join(pool)})")
    return hits[0]
