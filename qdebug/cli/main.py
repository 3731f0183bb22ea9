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

EXIT_ERROR = 1
EXIT_INTERNAL = 70
COMMAND_MODULES = ("inspect", "write", "check", "tui")


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

    p = argparse.ArgumentParser(prog="qdebug", description="Debugger for qcow2 images with subclusters.")
    p.add_argument("--version", action="version", version=f"qdebug {__import__('qdebug').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{mod}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # numpy's OpenBLAS starts a busy thread per core at import (~0.1 s of CPU at start, and it
    # competes with the one that works); qdebug does no linear algebra
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    exiting = argv is None  # called as the program (console script or -m), not from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and os.path.isfile(argv[0]) and argv[0] not in parser._subparsers._group_actions[0].choices:
        argv = ["tui", *argv]  # `qdebug IMAGE [--trace T]` opens the debugger
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if exiting:
        install_signal_handlers()
    try:
        return args.func(args)
    except QcowError as e:
        print(f"qdebug: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Terminated as e:
        print(f"qdebug: terminated by {e.name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("qdebug: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file qdebug reads or writes besides the image (a trace, a log...)
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
        if exiting:  # the interpreter's last collection would walk every object numpy made (~30 ms)
            import gc

            gc.freeze()
