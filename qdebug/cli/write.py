"""`qdebug create | plan | replay | undo`: the write side of the command line.

Thin views over the engine: every command that writes takes QEMU's locks first, refuses corrupt
images, never writes a backing file, and changes the image only inside journal steps, so an error in
the middle of a command leaves the image as it was before that command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

from ..engine.errors import QcowError
from .common import one_line, size_arg
from .conventions import add_force_share


# ---- create ---------------------------------------------------------------------------------------
def parse_create_options(texts):
    """`-o cluster_size=64k,extended_l2=on,...` as qemu-img spells it (see create_options.py)."""
    from .create_options import parse_create_options as parse

    return parse(texts)


def _refuse_if_in_use(path: str) -> None:
    """qemu-img create refuses to overwrite an image a running QEMU holds; so do we."""
    from ..engine.file.locking import ImageLock

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        ImageLock(fd, path, write=True, where=f"{path}: ").acquire().release()  # qemu-img create's words
    finally:
        os.close(fd)


def _backing_size(path: str, backing: str, fmt: str | None) -> int:
    from ..engine.file.chain import RawFile, open_chain, probe_format, resolve_backing_path

    bpath = resolve_backing_path(path, backing)
    if (fmt or probe_format(bpath)) == "raw":
        raw = RawFile(bpath)
        raw.close()
        return raw.size
    with open_chain(bpath) as chain:
        return chain.size


def cmd_create(args) -> int:
    from ..engine.write.create import create_image
    from .create_options import compat_version, formatting_line, options_help, refuse_unsupported

    if any(t in ("help", "?") for t in args.options or []):
        print(options_help())
        return 0
    opts = parse_create_options(args.options)
    if args.backing:
        opts.text["backing_file"] = opts.values["backing_file"] = args.backing
    if args.backing_format:
        opts.text["backing_fmt"] = opts.values["backing_fmt"] = args.backing_format
    refuse_unsupported(opts)
    backing, backing_fmt = opts.get("backing_file"), opts.get("backing_fmt")
    if backing and not backing_fmt:
        raise QcowError("Backing file specified without backing format (give it with -F or backing_fmt=)")
    if backing_fmt is not None and backing_fmt not in ("qcow2", "raw"):
        raise QcowError(f"backing format {backing_fmt!r}: qdebug reads qcow2 and raw backing files")
    if "size" in opts.values and args.size is not None:
        raise QcowError("The image size must be specified only once")
    size = opts.get("size", args.size)
    if size is None:
        if not backing:
            raise QcowError("Image creation needs a size parameter")
        size = _backing_size(args.image, backing, backing_fmt)
    opts.values["size"] = size
    version = compat_version(opts) if opts.text.get("compat") in ("0.10", "v2") else 3
    if "extended_l2" not in opts.values and version == 3:  # qdebug's default (qemu-img's is off)
        opts.text["extended_l2"], opts.values["extended_l2"] = "on", True
    _refuse_if_in_use(args.image)
    if not args.quiet:  # printed before the image is made, as qemu-img does (and before its errors)
        print(formatting_line(args.image, opts), flush=True)
    warnings = create_image(
        args.image, size, cluster_size=opts.get("cluster_size", 65536), extended_l2=bool(opts.get("extended_l2", False)),
        refcount_bits=opts.get("refcount_bits", 16), compression_type=opts.get("compression_type", "zlib"),
        backing=backing, backing_format=backing_fmt, version=compat_version(opts),
        lazy_refcounts=bool(opts.get("lazy_refcounts", False)), preallocation=opts.get("preallocation", "off"),
        nocow=bool(opts.get("nocow", False)), extent_size_hint=opts.get("extent_size_hint"))
    for w in warnings:
        print(f"qdebug: warning: {w}", file=sys.stderr)
    _drop_stale_journal(args.image)
    return 0


def _drop_stale_journal(image: str) -> None:
    """The undo journal of the image a `create` just replaced belongs to no file any more (its
    steps would undo into the new image): removed, saying so."""
    from ..engine.file.journal import journal_path

    jpath = journal_path(image)
    if not os.path.lexists(jpath):
        return
    try:
        os.unlink(jpath)
    except OSError as e:
        print(f"qdebug: warning: {jpath}: the undo journal of the image replaced could not be removed "
              f"({e.strerror}); remove it before writing {image}", file=sys.stderr)
        return
    print(f"qdebug: note: removed {jpath}, the undo journal of the image {image} replaced", file=sys.stderr)


# ---- plan -------------------------------------------------------------------------------------------
def _parse_command_arg(text: str, source: str, strict: bool = False):
    from ..trace.commands import parse_line
    from ..trace.syntax import SyntaxProblem

    try:
        cmd = parse_line(text, 0, strict)
    except SyntaxProblem as e:
        raise QcowError(f"{source}: {e}") from None
    if cmd is None:
        words = text.split("#", 1)[0].split()
        raise QcowError(f"{source}: {words[0]} changes and checks nothing (qemu-io only prints for it)" if words
                        else f"{source}: no command given")
    return cmd


def cmd_plan(args) -> int:
    from ..trace.replay import Replay, ReplayMode

    cmd = _parse_command_arg(args.command, "plan", args.strict)
    if not cmd.changes_image:
        raise QcowError(f"plan: {cmd.op} does not change the image; plan a write or discard")
    with Replay(args.image, mode=ReplayMode.DRY_RUN, force_share=args.force_share) as replay:  # a reader's locks
        plan = replay.preview(cmd)
    assert plan is not None
    if args.output == "json":
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(plan.to_text())
    return 0


# ---- replay ------------------------------------------------------------------------------------------
class _Progress:
    """A one-line progress meter on stderr, only when stderr is a terminal."""

    def __init__(self, total: int | None):
        self.on = sys.stderr.isatty()
        self.total = total
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def update(self, done: int, force: bool = False) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\rreplay: {done}{of} commands, {rate:,.0f}/s ")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def hazard_text(h) -> str:
    """The engine's hazard message, which names the guest range QEMU corrupts; always says "hazard"."""
    text = str(getattr(h, "message", None) or h)
    return text if text.startswith("hazard") else f"hazard: {text}"


def _trace_lines(path: str):
    """The trace as lines exactly as qemu-io reads them: only "\n" ends a line (a "\r" stays
    in the line, where qemu-io rejects it too), bytes that are not UTF-8 kept (and refused where
    qemu-io refuses them), standard input read as it comes."""
    if path == "-":
        if sys.stdin is None:
            raise QcowError("standard input is closed: no trace to read")
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="\n")
    try:
        return open(path, encoding="utf-8", errors="surrogateescape", newline="\n")
    except OSError as e:
        raise QcowError(f"{path}: cannot read the trace: {e.strerror}") from None


# Commands a checked trace keeps parsed for its run (about 250 bytes each); a longer trace is read
# and parsed again as it runs, in constant memory.
KEEP_COMMANDS = 500_000


def _checked_trace(lines, source: str, keep_going: bool, strict: bool = False, fgets: bool | None = None,
                   keep: list | None = None):
    """Every line through the parser before anything is written: a line qdebug cannot run
    (Unsupported: qemu-io would run it) is always refused, a line qemu-io rejects too unless
    --keep-going (which reports it in its place and goes on, as qemu-io does). Returns the
    lines to run (stdin is read whole) and the number of commands; with `keep`, the parsed
    commands are appended to it (see check_trace; empty when the trace is too long to hold)."""
    from ..trace.commands import check_trace
    from ..trace.syntax import Unsupported

    if not isinstance(lines, list) and not lines.seekable():
        lines = list(lines)
    count, problems = check_trace(lines, source, strict, fgets, keep, KEEP_COMMANDS)
    refused = [str(e) for _n, e in problems if isinstance(e, Unsupported) or not keep_going]
    if refused:
        for message in refused[:-1]:
            print(f"qdebug: error: {one_line(message)}", file=sys.stderr)
        raise QcowError(f"{refused[-1]} (nothing was written: {len(refused)} line(s) refused)")
    if not isinstance(lines, list):
        lines.seek(0)
    return lines, count


def _syntax_record(lineno: int, line: str, error, args) -> dict:
    """A step-log record of a line the parser refused: no step ("index" null), nothing done, and
    the keys a step's record has under the same --log-* options (a plan of nothing, "cost" and
    "seconds" null), so every record of a log has one shape."""
    from ..engine.write.plan import WritePlan
    from ..engine.write.step import LOG_VERSION

    out: dict = {"log-version": LOG_VERSION, "index": None, "line": lineno, "command": line.rstrip("\n")}
    if args.log_plans:
        out.update(WritePlan(command="", line=0).to_json(), command=out["command"], line=lineno,
                   error=str(error), **{"file-size-before": None, "file-size-after": None})
    else:
        out.update({"error": str(error), "hazards": [], "host-writes": [], "clusters": []})
    if args.log_plans or args.log_costs:
        out["cost"] = None
    if args.log_timing:
        out["seconds"] = None
    return out


def cmd_replay(args) -> int:
    from ..trace.commands import numbered, parse_line, sleep_ms
    from ..trace.replay import Replay, ReplayMode, quiet_gc
    from ..trace.syntax import SyntaxProblem
    from .main import StepSignals

    strict = args.strict
    fgets = strict and not args.commands  # qemu-io reads a trace on stdin with fgets, -c whole
    from_stdin = args.trace == "-" and not args.commands
    if args.commands:  # -c CMD, as qemu-io runs them (a trace too is refused: which would go first?)
        if args.trace is not None:
            raise QcowError("replay: give a trace or -c commands, not both")
        source, lines = "-c", [c + "\n" for c in args.commands]
    elif args.trace is None:
        raise QcowError("replay: no trace given (a file, '-' for standard input, or -c COMMAND)")
    else:
        source = "<stdin>" if args.trace == "-" else args.trace
        lines = _trace_lines(args.trace)
    progress = None
    log = None
    failures = 0
    signals = StepSignals()  # a signal waits for the end of the step under way
    mode = ReplayMode.DRY_RUN if args.dry_run else ReplayMode.JOURNALED if args.journal else ReplayMode.WRITE_BACK

    def fail(where: str, message: str) -> None:
        nonlocal failures
        failures += 1
        if not args.keep_going:
            raise QcowError(f"{where}: {message}")
        print(f"qdebug: error: {one_line(f'{where}: {message}')}", file=sys.stderr)

    try:
        if args.log == "-":
            log = sys.stdout
        elif args.log:
            try:
                log = open(args.log, "w", encoding="utf-8")
            except OSError as e:
                raise QcowError(f"{args.log}: cannot write the step log: {e.strerror}") from None
        if not from_stdin:  # refused before the image is even opened
            lines, total = _checked_trace(lines, source, args.keep_going, strict, fgets)
        with Replay(args.image, mode=mode, durable=args.journal, source=source, history=False,
                    timing=args.log_timing, force_share=args.force_share) as replay:
            if from_stdin:  # after the locks: a trace piped in may be written while qdebug holds the image
                lines, total = _checked_trace(lines, source, args.keep_going, strict, fgets)
            progress = _Progress(total)
            for note in replay.notes:
                print(f"qdebug: note: {note}", file=sys.stderr)
            quiet_gc()
            step = replay.step
            signals.__enter__()
            for lineno, line, cut in numbered(lines, fgets):
                signals.check()  # (a signal that came during the step before: its record is logged)
                try:
                    cmd = parse_line(line, lineno, strict)
                except SyntaxProblem as e:
                    if log:  # the log is complete: a line that failed is a record too
                        log.write(json.dumps(_syntax_record(lineno, line, f"{e}{cut}", args)) + "\n")
                    fail(f"{source}:{lineno}", f"{e}{cut}")
                    continue
                if cmd is None:
                    if not args.dry_run and "sleep" in line:  # waits as qemu-io does, the image held
                        time.sleep(min(sleep_ms(line, strict) / 1000, 1 << 31))
                    continue
                if cmd.op == "quit":  # qemu-io reads no further
                    break
                signals.busy = True
                rec = step(cmd)
                signals.busy = False
                assert rec is not None
                if log:
                    log.write(json.dumps(rec.to_json(plan=args.log_plans, timing=args.log_timing,
                                                     cost=args.log_costs)) + "\n")
                for h in rec.hazards:
                    print(f"qdebug: {source}:{rec.command.lineno}: {rec.command.source_text}: {hazard_text(h)}",
                          file=sys.stderr)
                if rec.error and cmd.asynchronous:  # qemu-io prints it; the command succeeded
                    print(f"qdebug: {source}:{lineno}: {cmd.source_text}: {rec.error} "
                          f"(reported, as qemu-io does for {cmd.verb})", file=sys.stderr)
                elif rec.error:
                    fail(f"{source}:{rec.command.lineno}", f"{rec.command.source_text}: {rec.error}")
                progress.update(rec.index + 1)
            signals.check()
            progress.update(replay.steps_run, force=True)
    finally:
        signals.__exit__()
        if progress is not None:
            progress.done()
        if log is not None and log is not sys.stdout:
            log.close()
        elif log is not None:
            log.flush()
        if not isinstance(lines, list) and not from_stdin:
            lines.close()
    if failures:
        print(f"qdebug: replay: {failures} command(s) failed", file=sys.stderr)
        return 1
    return 0


# ---- undo --------------------------------------------------------------------------------------------
def cmd_undo(args) -> int:
    from ..engine.file.journal import undo

    res = undo(args.image, steps=None if args.all else args.steps, discard=args.discard_journal)
    if args.output == "json":
        print(json.dumps(res.to_json(), indent=2))
        return 0
    if args.discard_journal:
        print(f"{args.image}: undo journal removed ({res.discarded} step(s) can no longer be undone); "
              "the image is kept as it is")
        return 0
    parts = []
    if res.interrupted:
        parts.append("rolled back the step an interrupted run left unfinished")
    if res.undone or not res.interrupted:
        parts.append(f"undid {res.undone} step(s)")
    print(f"{args.image}: " + ", ".join(parts) + f"; {res.remaining} step(s) left in the journal")
    return 0


# ---- registration ------------------------------------------------------------------------------------
STRICT_HELP = ("accept exactly what qemu-io 7.2 accepts (no '#' comments, no byte order mark, a line of more "
               "than 1023 bytes read as qemu-io reads it from stdin) and refuse every other line, by line")


def add_strict(sp) -> None:
    sp.add_argument("--strict", action="store_true", help=STRICT_HELP)


def _positive(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid step count {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"step count must be at least 1, got {n}")
    return n


def register(sub) -> None:
    sp = sub.add_parser("create", help="create a qcow2 image (extended L2 on by default) as qemu-img 7.2 does")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("size", metavar="SIZE", type=size_arg, nargs="?", help="virtual size (optional with -b)")
    sp.add_argument("-f", dest="format", choices=("qcow2",), default="qcow2", help="image format (qcow2)")
    sp.add_argument("-o", dest="options", metavar="OPTIONS", action="append",
                    help="qemu-img's qcow2 options: cluster_size=64k,extended_l2=on,preallocation=metadata,"
                         "lazy_refcounts=on,compat=0.10,refcount_bits=16,compression_type=zstd,... ('-o help')")
    sp.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (relative to IMAGE's directory)")
    sp.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"), help="backing file format")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_create)

    sp = sub.add_parser("plan", help="what QEMU would do for one write or discard (image untouched)")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("command", metavar="COMMAND", help="qemu-io syntax, e.g. 'write -P 0x22 8k 4k'")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    add_strict(sp)
    add_force_share(sp)
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("replay", help="apply a qemu-io trace exactly as QEMU 7.2 would")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("trace", metavar="TRACE", nargs="?", help="qemu-io commands, one per line ('-' reads stdin)")
    sp.add_argument("-c", dest="commands", metavar="COMMAND", action="append",
                    help="run COMMAND instead of a trace (repeatable, in order, as qemu-io -c)")
    sp.add_argument("--log", metavar="STEPS.jsonl",
                    help="write one JSON object per step (log-version 2: index, line, command, error, hazards, "
                         "host-writes, clusters); '-': standard output")
    sp.add_argument("--log-plans", action="store_true",
                    help="log each step's whole plan (requests, L2Metas, COW sources...: the keys of "
                         "`qdebug plan --output=json`); slower")
    sp.add_argument("--log-timing", action="store_true", help="log each step's duration (seconds)")
    sp.add_argument("--log-costs", action="store_true",
                    help="log what each step cost as QEMU spends it (\"cost\": guest, host data, COW and its "
                         "avoidable part, COW reads, metadata bytes, allocations, file sizes; also with --log-plans)")
    sp.add_argument("--dry-run", action="store_true",
                    help="plan every command as the replay would (each after the ones before); write nothing")
    sp.add_argument("--journal", action="store_true",
                    help="keep a durable undo journal (IMAGE.qdebug-journal), a step per command, for `qdebug undo`; "
                         "without it metadata is written back at each flush line and at the end, and a "
                         "crash rolls back to the last flush")
    sp.add_argument("--keep-going", action="store_true",
                    help="go on after failing commands like qemu-io does; exit non-zero at the end")
    add_strict(sp)
    add_force_share(sp, dry_run_only=True)
    sp.set_defaults(func=cmd_replay)

    sp = sub.add_parser("undo", help="step an image back through its undo journal",
                        description="Step an image back through its undo journal. After a crash, the step the "
                                    "crashed run left unfinished counts as the first step undone (and is rolled "
                                    "back only if the image is still as that step left it).")
    sp.add_argument("image", metavar="IMAGE")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive, default=1, metavar="N", help="undo the last N steps (default 1)")
    g.add_argument("--all", action="store_true", help="undo every step in the journal")
    g.add_argument("--discard-journal", action="store_true",
                   help="remove the journal and keep the image as it is now (no step can be undone afterwards)")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.set_defaults(func=cmd_undo)
