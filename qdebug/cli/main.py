"""`qdebug` command line: thin views over engine objects, text or JSON, qemu-img-like exit codes.

Every error a user can cause ends as one line on stderr and a non-zero exit; Textual is imported
only by the commands that open the TUI, so the other commands start fast. Each module of this
package registers its subcommands (`register(sub)`).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..engine.errors import QcowError
from .common import one_line

from .conventions import EXIT_ERROR, EXIT_INTERNAL

COMMAND_MODULES = ("inspect", "write", "check", "scan", "forensics", "trace_import", "workload", "tui", "schema")


class _Version(argparse.Action):
    """`qdebug --version`: the version and the engine this install runs (compiled or pure Python),
    worked out only when asked (it imports the engine)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .. import __version__, native

        print(f"qdebug {__version__}: {native.describe()}")
        parser.exit()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Python is as SIGINT raises KeyboardInterrupt: every step
    that is under way finishes or is rolled back on the way out (the engine treats all three
    alike), and the command exits with a message instead of dying with its work half done."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _raise_terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


class StepSignals:
    """SIGINT, SIGTERM and SIGHUP that arrive while a replay step runs wait for the step's end.

    A write-back step cut short in the middle keeps the host writes it made: QEMU's order
    (a write-zeroes over [cow_start, cow_end), then the data) would leave zeros where the guest
    had data. So the first signal is acted on between steps (`check`); a second one, or one that
    comes between steps (a trace read from a pipe that blocks), is acted on at once.
    """

    def __init__(self) -> None:
        self.busy = False
        self.pending: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StepSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                old = signal.getsignal(sig)
                if old in (signal.default_int_handler, _raise_terminated):  # (ours, not a caller's)
                    self._old[sig] = old
                    signal.signal(sig, self._arrived)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _arrived(self, signum: int, _frame) -> None:
        if self.busy and self.pending is None:
            self.pending = signum
            return
        _raise_for(signum)

    def check(self) -> None:
        """After a step: the signal that waited for it, if any, ends the command now."""
        if self.pending is not None:
            _raise_for(self.pending)


def _raise_for(signum: int) -> None:
    import signal

    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP as SIGINT (only where qdebug runs as the program, in its main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_terminated)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .conventions import Parser, prepare_parser

    p = Parser(prog="qdebug", description="Debugger for qcow2 images with subclusters. "
               "`qdebug IMAGE` opens the interactive debugger on IMAGE.")
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and which engine runs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{mod}").register(sub)
    for sp in sub.choices.values():  # every command: what backing files it may follow
        _untrusted_options(sp)
    prepare_parser(p, sub)
    return p


# --untrusted / --backing-dir / --allow-backing: the environment variables of the same meaning
# (engine.file.chain.BackingPolicy.from_env reads them), set for the one command.
_POLICY_ENV = (("untrusted", "QDEBUG_UNTRUSTED"), ("backing_dir", "QDEBUG_BACKING_DIR"),
               ("allow_backing", "QDEBUG_ALLOW_BACKING"))


def _untrusted_options(sp) -> None:
    have = sp._option_string_actions
    if "--untrusted" not in have:
        sp.add_argument("--untrusted", action="store_true", default=None,
                        help="the image comes from elsewhere: follow backing files only inside its directory "
                             "(also QDEBUG_UNTRUSTED=1)")
    if "--backing-dir" not in have:
        sp.add_argument("--backing-dir", action="append", metavar="DIR",
                        help="with --untrusted: also follow backing files inside DIR")
    if "--allow-backing" not in have:
        sp.add_argument("--allow-backing", action="append", metavar="PATH",
                        help="follow this backing file, whatever and wherever it is (a device, outside the tree)")


def _policy_env(args) -> dict:
    """Set the policy variables the options ask for; returns the old values to restore."""
    old = {}
    for attr, var in _POLICY_ENV:
        v = getattr(args, attr, None)
        if not v:
            continue
        old[var] = os.environ.get(var)
        os.environ[var] = "1" if v is True else os.pathsep.join([*filter(None, [os.environ.get(var)]), *v])
    return old


def _only_reads(args) -> bool:
    """The command as called only reads (where -U applies): not check -r, a replay or a repair that write."""
    if getattr(args, "repair", None):
        return False
    return getattr(args, "dry_run", True)


def _naming_the_file(e: QcowError, image: str | None) -> str:
    """Every error names its file: an error about the image's content that does not ("not a qcow2
    image (bad magic at offset 0)", "header truncated...") gets the image's name in front."""
    from ..engine.errors import CorruptImage, NotQcow2

    message = str(e)
    if not image or image in message or not isinstance(e, (NotQcow2, CorruptImage)):
        return message
    return f"{image}: {message}"


def _not_an_image(name: str) -> str | None:
    """Why `name` (the first argument, not a command) cannot be opened as IMAGE, as strerror says it."""
    import errno

    try:
        st = os.stat(name)
    except OSError as e:
        return f"{name}: {e.strerror}"
    import stat

    if stat.S_ISDIR(st.st_mode):
        return f"{name}: {os.strerror(errno.EISDIR)}"
    return None


def main(argv: list[str] | None = None) -> int:
    # numpy's OpenBLAS starts a busy thread per core at import (~0.1 s of CPU at start, and it
    # competes with the one that works); qdebug does no linear algebra
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .conventions import guard_streams, preflight, quiet_broken_pipe, stream_error

    exiting = argv is None  # called as the program (console script or -m), not from Python
    if exiting:
        guard_streams()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in parser._subparsers._group_actions[0].choices:
        problem = _not_an_image(argv[0])
        if problem:  # `qdebug nope.qcow2`: the file's problem, not argparse's list of commands
            print(f"qdebug: error: {one_line(problem)}", file=sys.stderr)
            return EXIT_ERROR
        argv = ["tui", *argv]  # `qdebug IMAGE [--trace T]` opens the debugger
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser: its usage, its usage status (salvage's is 2)
        choices = parser._subparsers._group_actions[0].choices
        (choices.get(getattr(args, "command", None)) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.error("not enough arguments: give a COMMAND, or an IMAGE to open the debugger on "
                     "(`qdebug --help` lists the commands)")  # qemu-img: "Not enough arguments", 1
    if exiting:
        install_signal_handlers()
    saved = _policy_env(args)
    hold = None
    stderr = sys.stderr  # -q filters it for the one command
    try:
        hold = preflight(args)
        status = args.func(args)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the handlers below
        return status
    except QcowError as e:
        hint = ""
        if type(e).__name__ == "ImageInUse" and getattr(args, "force_share", None) is False and _only_reads(args):
            hint = " (-U reads it anyway; the results may be transient)"
        print(f"qdebug: error: {one_line(_naming_the_file(e, getattr(args, 'image', None)))}{hint}",
              file=sys.stderr)
        return getattr(args, "error_exit", EXIT_ERROR)  # salvage: 1 means "something lost", errors are 2
    except BrokenPipeError:  # the reader went away (`| head`): quietly, with the command's status (qemu-img's)
        quiet_broken_pipe()
        return getattr(args, "exit_status", 0)
    except Terminated as e:
        print(f"qdebug: terminated by {e.name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("qdebug: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file qdebug reads or writes besides the image (a trace, a log...)
        stdout_problem = stream_error(e)
        if stdout_problem:
            quiet_broken_pipe()  # Python's own flush at exit must not fail again with a traceback
            print(f"qdebug: error: {stdout_problem}", file=sys.stderr)
            return EXIT_ERROR
        where = f"{e.filename}: " if e.filename else ""
        print(f"qdebug: error: {one_line(where + (e.strerror or str(e)))}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print("qdebug: error: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        if os.environ.get("QDEBUG_DEBUG"):
            raise
        print(f"qdebug: internal error: {type(e).__name__}: {e} (set QDEBUG_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if hold is not None:
            hold.release()
        sys.stderr = stderr
        for var, v in saved.items():
            if v is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = v
        if exiting:  # the interpreter's last collection would walk every object numpy made (~30 ms)
            import gc

            gc.freeze()
