"""`qdebug stats` (what a trace costs on an image) and `qdebug whatif` (what it would cost on other
geometries): dry runs, the image untouched; text, JSON, and a chart."""

from __future__ import annotations

import argparse
import json
import sys

from ..engine.errors import QcowError
from .common import human_size, size_arg


def _ratio(x: float | None, unit: str = "x") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def cost_lines(t) -> list[str]:
    """A StepCost (one step or a whole trace) as the lines `qdebug stats` prints."""
    reads = ", ".join(f"{k} {v:,}" for k, v in t.cow_read_bytes) or "none"
    meta = ", ".join(f"{k} {v:,}" for k, v in t.metadata) or "none"
    return [
        f"guest:            {t.guest_write_bytes:,} bytes written, {t.guest_zero_bytes:,} zeroed, "
        f"{t.guest_discard_bytes:,} discarded",
        f"host data:        {t.host_data_bytes:,} bytes (guest data and COW), in {t.host_write_requests:,} "
        f"write requests with the metadata",
        f"COW:              {t.cow_bytes:,} bytes, of which avoidable {t.cow_avoidable_bytes:,} "
        f"({_share(t.avoidable_share)}: subclusters that were '-' or '0' and read the same if left so)",
        f"COW reads:        {reads} ({t.cow_read_requests:,} requests)",
        f"zero-fills:       {t.zero_fill_bytes:,} bytes (write-zeroes instead of copying zeros)",
        f"metadata:         {t.metadata_bytes:,} bytes as writethrough QEMU writes them ({meta})",
        f"amplification:    {_ratio(t.write_amplification)} host bytes per guest byte written "
        f"(data only {_ratio(t.data_amplification)})",
        f"allocated:        {t.allocated_clusters:,} data clusters, {t.l2_tables_allocated:,} L2 tables, "
        f"{t.refcount_blocks_allocated:,} refcount blocks",
        f"file size:        {t.file_size_before:,} -> {t.file_size_after:,} bytes "
        f"({human_size(t.file_size_before)} -> {human_size(t.file_size_after)})",
    ]


def _open_trace(path: str):
    from .write import _trace_lines

    return _trace_lines(path)


def _checked(path: str, strict: bool, keep: list | None = None):
    """The trace's lines, every line parsed before anything is planned (as replay does); with
    `keep`, the commands parsed (see _checked_trace)."""
    from .write import _checked_trace

    lines, _count = _checked_trace(_open_trace(path), "<stdin>" if path == "-" else path, keep_going=False,
                                   strict=strict, keep=keep)
    return lines


def _failures(cost) -> None:
    if cost.failed:
        for e in cost.errors:
            print(f"qdebug: note: {e} (QEMU fails it too: it costs nothing)", file=sys.stderr)
        print(f"qdebug: note: {cost.failed} command(s) fail as they would in QEMU", file=sys.stderr)


def cmd_stats(args) -> int:
    from ..trace.workload import commands_cost, trace_cost

    source = "<stdin>" if args.trace == "-" else args.trace
    commands: list = []
    lines = _checked(args.trace, args.strict, commands)
    try:  # (a trace too long to keep parsed is parsed again as it runs)
        cost = commands_cost(args.image, commands, source, policy=args.policy, force_share=args.force_share) \
            if commands else trace_cost(args.image, lines, source, policy=args.policy, strict=args.strict,
                                        force_share=args.force_share)
    finally:
        if hasattr(lines, "close"):
            lines.close()
    _failures(cost)
    if args.output == "json":
        print(json.dumps({"image": args.image, "trace": source, "policy": args.policy, **cost.to_json()}, indent=2))
        return 0
    how = "as QEMU 7.2 runs them" if args.policy == "qemu" else \
        "with the minimal COW (NOT QEMU: only what must be preserved is copied)"
    print(f"{args.image}: {source}: {cost.commands:,} commands planned {how} (dry run: the image is untouched)")
    for line in cost_lines(cost.total):
        print(line)
    return 0


# ---- whatif --------------------------------------------------------------------------------------
def _list(kind):
    def parse(text: str) -> list:
        out = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                raise argparse.ArgumentTypeError(f"{text!r}: an empty item in the list")
            out.append(kind(part))
        return out
    return parse


def _on_off(text: str) -> bool:
    if text in ("on", "true", "yes"):
        return True
    if text in ("off", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: say on or off")


def _cluster_size(text: str) -> int:
    n = size_arg(text)
    if n < 512 or n > 2 << 20 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{text!r}: a cluster size is a power of two from 512 bytes to 2 MiB")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return n


def geometries(cluster_sizes: list[int], extended: list[bool], refcount_bits: int) -> tuple[list, list[str]]:
    """Every combination QEMU can create (extended L2 needs 16 KiB clusters or more), and notes on
    the ones it cannot."""
    from ..trace.workload import Geometry

    out, skipped = [], []
    for cs in dict.fromkeys(cluster_sizes):
        for ext in dict.fromkeys(extended):
            if ext and cs < 16384:
                skipped.append(f"{human_size(cs)} clusters with extended L2: QEMU needs 16 KiB clusters or more")
                continue
            out.append(Geometry(cs, ext, refcount_bits))
    return out, skipped


def cmd_whatif(args) -> int:
    import os

    from ..engine.file.locking import lock_files
    from ..trace.workload import recommend, whatif

    if args.trace == "-":
        raise QcowError("whatif: give the trace as a file (each geometry reads it again)")
    _checked(args.trace, args.strict).close()
    if args.backing and not args.backing_format:
        raise QcowError("Backing file specified without backing format (give it with -F)")
    if args.backing and not os.path.exists(args.backing):
        raise QcowError(f"{args.backing}: no such backing file")
    geos, skipped = geometries(args.cluster_size, args.extended_l2, args.refcount_bits)
    for s in skipped:
        print(f"qdebug: note: left out {s}", file=sys.stderr)
    if not geos:
        raise QcowError("whatif: no geometry left to plan")
    if args.chart:
        from .chart import check_chart_path

        check_chart_path(args.chart)
    policies = ("qemu",) if args.policy == "qemu" else ("qemu", "minimal-cow")
    # the backing chain is read throughout: a reader's locks on it first, refused naming the file as
    # given (the planned images are temporary files), as `qemu-io -r BACKING` refuses it
    held = lock_files(args.backing) if args.backing else None
    try:
        rows = whatif(args.trace, args.size, geos, args.backing, args.backing_format, jobs=args.jobs,
                      policies=policies, strict=args.strict)
    finally:
        if held is not None:
            held.release()
    _failures(rows[0].cost)
    best = recommend(rows)
    if args.output == "json":
        print(json.dumps([r.to_json() | {"recommended": best is not None and r is best.row} for r in rows], indent=2))
    else:
        print(whatif_table(rows))
        if best is not None:
            print(f"recommended: {best.row.geometry.label} ({best.row.geometry.refcount_bits}-bit refcounts): "
                  f"{best.reason}")
        else:
            print("recommended: nothing to choose: the trace writes nothing")
    if args.chart:
        from .chart import save_chart, terminal_chart

        save_chart(rows, args.chart)
        if args.output != "json":
            print()
            print(terminal_chart(rows))
            print(f"chart: {args.chart}")
    return 0


COLUMNS = ("geometry", "guest written", "host data", "COW", "avoidable", "metadata", "amplification",
           "file size", "L2 cache", "metadata share")


def whatif_table(rows) -> str:
    """One line per geometry, the columns aligned."""
    cells = [COLUMNS]
    for r in rows:
        t = r.cost.total
        share = r.to_json()["metadata-overhead"]
        cells.append((r.label, human_size(t.guest_write_bytes), human_size(t.host_data_bytes),
                      human_size(t.cow_bytes), _share(t.avoidable_share), human_size(t.metadata_bytes),
                      _ratio(t.write_amplification), human_size(t.file_size_after), human_size(r.l2_cache_bytes),
                      _share(share)))
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def register(sub) -> None:
    from .conventions import add_force_share
    from .write import add_strict

    sp = sub.add_parser("stats", help="what a trace costs on an image, step by step as QEMU 7.2 spends it "
                                      "(dry run: the image is untouched)")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("trace", metavar="TRACE", help="qemu-io commands, one per line ('-' reads stdin)")
    sp.add_argument("--output", choices=("text", "json"), default="text")
    sp.add_argument("--policy", choices=("qemu", "minimal-cow"), default="qemu",
                    help="minimal-cow: plan a COW that copies only what must be preserved (NOT QEMU; what "
                         "QEMU's simpler policy costs)")
    add_strict(sp)
    add_force_share(sp)
    sp.set_defaults(func=cmd_stats)

    sp = sub.add_parser("whatif", help="what a trace would cost on fresh images of other geometries "
                                       "(dry runs: no image file of the virtual size is written)")
    sp.add_argument("trace", metavar="TRACE", help="qemu-io commands, one per line")
    sp.add_argument("--size", type=size_arg, required=True, metavar="SIZE", help="virtual size of the images")
    sp.add_argument("-b", dest="backing", metavar="BACKING", help="a backing file the images sit on")
    sp.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"), metavar="FMT",
                    help="the backing file's format (qcow2 or raw)")
    sp.add_argument("--cluster-size", type=_list(_cluster_size), default=[65536, 131072, 524288, 2 << 20],
                    metavar="LIST", help="cluster sizes to try (default 64k,128k,512k,2M)")
    sp.add_argument("--extended-l2", type=_list(_on_off), default=[True, False], metavar="LIST",
                    help="extended L2 entries on, off or both (default on,off)")
    sp.add_argument("--refcount-bits", type=int, choices=(1, 2, 4, 8, 16, 32, 64), default=16, metavar="N",
                    help="refcount width of the images (default 16)")
    sp.add_argument("--policy", choices=("qemu", "minimal-cow"), default="qemu",
                    help="minimal-cow: beside each extended-L2 geometry, the same planned with a COW that copies "
                         "only what must be preserved (NOT QEMU)")
    sp.add_argument("--jobs", type=_positive, default=1, metavar="N", help="geometries planned side by side")
    sp.add_argument("--output", choices=("text", "json"), default="text")
    sp.add_argument("--chart", metavar="FILE.svg|FILE.png", help="draw host bytes by kind and file size per geometry "
                                                                 "(also shown in the terminal)")
    add_strict(sp)
    sp.set_defaults(func=cmd_whatif)
