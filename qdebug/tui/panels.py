"""Small panels: header and feature bits, backing chain, subcluster counts (from `info_record`)."""

from __future__ import annotations

import os

from textual.content import Content

from ..engine.format.subclusters import SubclusterType as T
from ..engine.read.summary import info_record
from .inspector import TYPE_STYLE


def human(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if v < 1024 or unit == "PiB":
            return f"{n} B" if unit == "B" else f"{v:.4g} {unit}"
        v /= 1024
    return f"{n} B"


def header_content(chain) -> Content:
    rec = info_record(chain, counts=False)
    q = rec["qdebug"]
    g = q["geometry"]
    fs = rec["format-specific"]["data"]
    dim = "$text-muted"
    feats = [f["name"] for f in q["features"]] or ["none"]
    flags = []
    if rec["dirty-flag"]:
        flags.append(("dirty", "bold $qd-warning"))
    if fs.get("corrupt"):
        flags.append(("corrupt", "bold $qd-error"))
    lines = [
        Content.assemble(("qcow2 v", dim), f"{q['version']}", ("  size ", dim), (human(rec["virtual-size"]), "bold"),
                         ("  cluster ", dim), human(rec["cluster-size"]),
                         ("  compression ", dim), fs["compression-type"]),
        Content.assemble(("extended L2 ", dim), ("on" if fs.get("extended-l2") else "off", "bold"),
                         ("  subclusters ", dim), f"{g['subclusters-per-cluster']} x {human(g['subcluster-size'])}",
                         ("  refcount ", dim), f"{fs['refcount-bits']}-bit"),
        Content.assemble(("features ", dim), ", ".join(feats), *[("  ", ""), *flags] if flags else []),
        Content.assemble(("L1 ", dim), f"{g['l1-size']} @ 0x{g['l1-table-offset']:x}", ("  L2 tables ", dim),
                         f"{g['l2-tables']}", ("  file ", dim), human(g["file-size"])),
    ]
    snaps = chain.top.snapshots()
    if snaps:
        listed = ", ".join(f"{s.id} {s.name!r}" if s.name else s.id for s in snaps[:6])
        lines.append(Content.assemble((f"snapshots ({len(snaps)}) ", dim), listed, " …" if len(snaps) > 6 else "",
                                      ("  (S: a snapshot's map)", dim)))
    return Content("\n").join(lines)


def chain_content(chain, *, scratch: str | None = None) -> Content:
    lines = []
    for layer in info_record(chain, counts=False)["qdebug"]["backing-chain"]:
        d = layer["depth"]
        style = "$qd-data" if d == 0 else "$qd-backing"
        lines.append(Content.assemble((f"depth {d} ", style), (os.path.basename(layer["filename"]), "bold"),
                                      (f"  {layer['format']}, {human(layer['virtual-size'])}", "$text-muted")))
    if scratch:
        lines.append(Content.styled("writes go to a scratch copy; the image is untouched", "$text-muted"))
    return Content("\n").join(lines)


def counts_content(counts: dict[str, int] | None) -> Content:
    if counts is None:
        return Content.styled("counting subclusters…", "$text-muted")
    parts: list = []
    for t in T:
        n = counts.get(t.name, 0)
        if n:
            parts.append((f"{t.name} ", TYPE_STYLE[t]))
            parts.append(f"{n:,}  ")
    return Content.assemble(*parts)
