"""`qdebug scan`: check a fleet of images (qdebug/scan does the work; this module only prints).

`--output=json`: one JSON object per line per file, in completion order. Text: a progress bar on
stderr (when it is a terminal) and a summary. Exit code: the worst verdict; 130 after Ctrl-C
(the first one stops cleanly with a partial summary, a second one aborts the running checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time

from ..engine.errors import QcowError
from .common import human_size, one_line

_REDRAW = 0.1  # seconds between progress bar updates
_FLUSH = 0.1  # JSON lines reach a pipe at most this late


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"bad job count {text!r}: a positive number of worker processes")
    return n


def register(sub) -> None:
    sp = sub.add_parser("scan", help="check many images (qemu-img check's counts) in parallel, locally or on Dask")
    sp.add_argument("paths", nargs="*", metavar="PATH", help="image files, or directories walked recursively "
                    "(qcow2 images recognised by their magic)")
    sp.add_argument("--from", dest="from_list", metavar="LIST", help="read paths from LIST, one a line ('-': stdin)")
    sp.add_argument("--jobs", "-j", type=_jobs, metavar="N", help="local worker processes (default: the cores)")
    sp.add_argument("--dask", metavar="ADDRESS", help="run the checks on the Dask cluster whose scheduler is at "
                    "ADDRESS (tcp://HOST:8786); every worker must see the images at the same paths")
    sp.add_argument("--dask-timeout", type=float, default=30, metavar="SECONDS",
                    help="how long to try reaching the scheduler (default 30)")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.add_argument("--resume", metavar="STATE", help="record finished images in STATE and skip those already "
                    "there (same path, size and mtime)")
    sp.add_argument("--signatures", action=argparse.BooleanOptionalAction, default=True,
                    help="recognise known-bug damage patterns (default: on)")
    sp.add_argument("-U", "--force-share", action="store_true",
                    help="check images a running QEMU holds for writing too (as qemu-img check -U)")
    sp.set_defaults(func=cmd_scan)


def _sources(args):
    from ..scan.discover import discover, open_list, read_list

    def paths():
        yield from args.paths
        if args.from_list:
            try:
                stream = open_list(args.from_list)
            except OSError as e:
                raise QcowError(f"{args.from_list}: cannot read the list: {e.strerror}") from None
            with stream:
                yield from read_list(stream)

    return discover(paths())


def cmd_scan(args) -> int:
    if not args.paths and not args.from_list:
        raise QcowError("scan: nothing to scan: give PATHs or --from LIST")
    if args.dask and args.jobs:
        raise QcowError("scan: --jobs sets local workers; with --dask the cluster's workers do the checks")
    from ..scan.runners import DaskRunner, LocalRunner
    from ..scan.scan import Scan
    from ..scan.state import ScanState

    state = ScanState(args.resume) if args.resume else None
    try:
        runner = DaskRunner(args.dask, timeout=args.dask_timeout) if args.dask else LocalRunner(args.jobs)
    except BaseException:
        if state is not None:
            state.close()
        raise
    scan = Scan(_sources(args), runner, force_share=args.force_share, signatures=args.signatures, state=state)
    bar = _Bar(sys.stderr) if sys.stderr.isatty() else None
    json_out = args.output == "json"

    def first_interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts
        scan.stop()
        if bar:
            bar.clear()
        print("qdebug: scan: stopping: the running checks finish (Ctrl-C again to abort them)", file=sys.stderr)

    old = signal.signal(signal.SIGINT, first_interrupt)
    aborted: KeyboardInterrupt | None = None
    flushed = time.monotonic()
    try:
        for outcome in scan.run():
            if outcome is not None and json_out and outcome.record is not None:
                if bar:
                    bar.clear()
                sys.stdout.write(json.dumps(outcome.record) + "\n")
            if json_out and (outcome is None or time.monotonic() - flushed > _FLUSH):  # streamed, not per line
                sys.stdout.flush()
                flushed = time.monotonic()
            if bar:
                bar.draw(scan.progress())
    except KeyboardInterrupt as e:  # a second Ctrl-C, or SIGTERM / SIGHUP (main's Terminated)
        aborted = e
    finally:
        signal.signal(signal.SIGINT, old)
        if json_out:
            sys.stdout.flush()
        if bar:
            bar.clear()
        runner.close(wait=aborted is None)
    summary = scan.summary()
    if aborted is not None:
        summary = dataclasses.replace(summary, interrupted=True)
    _print_summary(summary, scan.progress(), sys.stderr if json_out else sys.stdout)
    if aborted is not None and type(aborted) is not KeyboardInterrupt:
        raise aborted  # terminated: main says by which signal and exits accordingly
    return summary.exit_code


class _Bar:
    """One line on a terminal: files, bytes, rate, ETA."""

    def __init__(self, out):
        self.out = out
        self.last = 0.0
        self.shown = False

    def draw(self, p) -> None:
        now = time.monotonic()
        if now - self.last < _REDRAW:
            return
        self.last = now
        rate = p.files_done / p.elapsed if p.elapsed > 0 else 0.0
        total = f"{p.files_found}{'+' if p.walking else ''}"
        frac = p.files_done / p.files_found if p.files_found else 0.0
        width = 24
        fill = int(frac * width)
        if p.walking or not rate:
            eta = "--:--"
        else:
            eta = _clock((p.files_found - p.files_done) / rate)
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {p.files_done}/{total} files  "
                f"{human_size(p.bytes_done)}/{human_size(p.bytes_found)}  "
                f"{rate:.0f} files/s {human_size(int(p.bytes_done / p.elapsed)) if p.elapsed else '0 B'}/s  ETA {eta}")
        self.out.write("\r\x1b[K" + line)
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False
            self.last = 0.0


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _print_summary(s, p, out) -> None:
    rate = f", {s.examined / p.elapsed:.0f} files/s" if p.elapsed > 0 else ""
    head = "scan interrupted" if s.interrupted else "scan"
    out.write(f"qdebug {head}: {_n(s.images, 'image')} checked, {_n(s.examined, 'file')} examined in "
              f"{p.elapsed:.1f} s{rate} ({human_size(p.bytes_done)}); {_n(s.workers, 'worker')}, "
              "peak memory per worker "
              f"{human_size(s.worker_peak_rss)}, workers' CPU time {s.worker_cpu:.1f} s\n")
    if s.resumed:
        out.write(f"  ({s.resumed} of them finished in an earlier run, from the resume state)\n")
    for verdict, n in s.by_verdict:
        extra = f"  ({human_size(s.leaked_bytes)} leaked in total)" if verdict == "leaks" and s.leaked_bytes else ""
        out.write(f"  {verdict:<13} {n:>8}{extra}\n")
    if s.leaked_bytes and not dict(s.by_verdict).get("leaks"):
        out.write(f"  leaked in total: {human_size(s.leaked_bytes)}\n")
    if s.errors:
        out.write(f"  {'not checked':<13} {s.errors:>8}  (cannot be checked: see below)\n")
    if s.skipped:
        out.write(f"  {'skipped':<13} {s.skipped:>8}  (files that are not qcow2 images)\n")
    if s.signatures:
        from ..engine.check.signatures import KNOWN

        out.write("known-bug signatures (--output=json has the evidence):\n")
        for name, n, first in s.signatures:
            title, produced_by = KNOWN.get(name, ("", "unknown"))
            out.write(f"  {name}: {_n(n, 'image')} (e.g. {one_line(first)})\n"
                      f"    {title}\n    produced by: {produced_by}\n")
    if s.worst:
        out.write("worst images:\n")
        for o in s.worst:
            from ..scan.tally import VERDICTS

            out.write(f"  {VERDICTS[o.exit_code]:<12} {o.corruptions} corruptions, {o.leaks} leaks"
                      f"{f', {o.check_errors} check errors' if o.check_errors else ''}  {one_line(o.filename)}\n")
    if s.first_errors:
        out.write("not checked:\n")
        for path, why in s.first_errors:
            out.write(f"  {one_line(path)}: {one_line(why)}\n")
        if s.errors > len(s.first_errors):
            out.write(f"  ... and {s.errors - len(s.first_errors)} more\n")
    if s.interrupted:
        out.write("interrupted: the summary covers the files finished so far"
                  " (--resume STATE continues such a scan)\n")
    out.flush()
