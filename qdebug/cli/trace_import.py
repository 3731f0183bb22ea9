"""`qdebug trace import`: a fio iolog or a QEMU trace-event log -> a qemu-io script."""

from __future__ import annotations

import os
import sys
import tempfile

from ..engine.errors import QcowError
from .common import human_size


def cmd_trace_import(args) -> int:
    from ..trace.importers import ImportProblem, import_trace

    try:
        trace = import_trace(args.file, args.kind, select=args.select, pattern_seed=args.pattern_seed)
    except ImportProblem as e:
        raise QcowError(str(e)) from None
    text = trace.to_text()
    if args.output == "-":
        sys.stdout.write(text)
        report = sys.stderr
    else:
        _write_whole(args.output, text)
        report = sys.stdout
    counts = ", ".join(f"{n} {what}{('es' if what.endswith('sh') else 's') if n != 1 else ''}"
                       for what, n in sorted(trace.counts().items()))
    print(f"{args.output if args.output != '-' else '<stdout>'}: {len(trace.commands)} commands from "
          f"{trace.selected} ({counts or 'none'}); needs a virtual size of at least {trace.size_needed} bytes "
          f"({human_size(trace.size_needed)})", file=report)
    for what, n in sorted(trace.skipped.items()):
        print(f"left out: {n} {what}", file=report)
    return 0


def _write_whole(path: str, text: str) -> None:
    """All of it or nothing: a temporary file beside `path`, renamed over it when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qdebug-import-", dir=folder)
    except OSError as e:
        raise QcowError(f"{path}: cannot write the trace: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise QcowError(f"{path}: cannot write the trace: {e.strerror}") from None


def _seed(text: str) -> int:
    import argparse

    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the pattern seed must not be negative")
    return value


def register(sub) -> None:
    sp = sub.add_parser("trace", help="work with traces (import a real workload)")
    tsub = sp.add_subparsers(dest="trace_command", metavar="SUBCOMMAND")
    sp.set_defaults(func=lambda args: (sp.print_help(sys.stderr), 1)[1])
    ip = tsub.add_parser("import", help="a fio iolog or a QEMU trace-event log -> a qemu-io script "
                                        "(qemu-io and `qdebug replay` both run it)")
    ip.add_argument("file", metavar="FILE", help="fio write_iolog output, or QEMU -trace / qemu-io -T output")
    ip.add_argument("-o", dest="output", metavar="TRACE", required=True, help="the qemu-io script to write ('-': stdout)")
    ip.add_argument("--from", dest="kind", choices=("fio", "qemu-trace"), required=True, help="what FILE is")
    ip.add_argument("--file", dest="select", metavar="NAME",
                    help="fio: the file whose I/O to take (when the log has several); qemu-trace: the BlockBackend "
                         "or node (0x address, or the node's file name)")
    ip.add_argument("--pattern-seed", type=_seed, default=1, metavar="N",
                    help="seed of the writes' pattern bytes (default 1): the same seed makes the same script")
    ip.set_defaults(func=cmd_trace_import)
