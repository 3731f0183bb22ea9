"""qemu-img's conventions for scripts, for every command at once: exit codes (usage errors exit 1,
each command's codes in its `--help`), the reader's locks on the image and its backing files and `-U`,
`-f FMT`, refusals of `--image-opts` / `json:` names, and standard streams that are closed,
full or a pipe closed early.

cli.main calls `prepare_parser` once the commands are registered and `preflight` before a
command runs; the commands stay free of this bookkeeping.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from ..engine.errors import QcowError

EXIT_OK, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 70
EXIT_NOT_SUPPORTED = 63  # qemu-img check on a format without checks (a file that is not qcow2)

# Exit codes every command shares, then each command's own (the table `--help` prints and
# tests/cli/test_exit_codes.py runs).
COMMON_EXITS = (
    (0, "success"),
    (1, "error: usage, a file that cannot be opened or read, an image in use (as qemu-img)"),
    (70, "internal error: a bug in qdebug (QDEBUG_DEBUG=1 shows the traceback)"),
    (130, "interrupted (Ctrl-C); 143 / 129 terminated by SIGTERM / SIGHUP"),
)
COMMAND_EXITS: dict[str, tuple[tuple[int, str], ...]] = {
    "check": ((0, "no errors were found"), (1, "the check could not be completed (or the image could not be "
              "opened), as qemu-img check"), (2, "corruptions found"), (3, "leaked clusters only"),
              (63, "not a qcow2 image: this image format does not support checks (as qemu-img)")),
    "repair": ((0, "nothing to repair (--dry-run), or everything repaired"),
               (2, "corruptions that would remain, or remain, unrepaired; with --dry-run: corruptions to repair"),
               (3, "with --dry-run: leaked clusters to repair")),
    "salvage": ((0, "every guest byte is known (recovered or zero by the image's own metadata)"),
                (1, "something is lost (zeros in the output)"),
                (2, "error (usage, a file that cannot be opened...): salvage's 1 means \"something lost\"")),
    "scan": ((0, "every image clean"), (1, "an image could not be checked"), (2, "corruptions in an image"),
             (3, "leaks (and nothing worse) in an image")),
    "replay": ((1, "a command of the trace failed (with --keep-going: at the end), or a line was refused"),),
}
USAGE_EXIT = {"salvage": 2}  # the exit status of a usage error where 1 means something else

# Commands that read an image without changing it. The ones marked True take the shared lock
# themselves (check, scan and salvage through the engine, plan and the dry runs through Replay);
# for the others `preflight` holds a reader's locks for the whole command, on the files the
# qemu-img command each stands for locks: info the image alone (opened without I/O; with
# --backing-chain each file of the chain, as an image of its own), map and read (qemu-io -r) the
# image and its backing files, layout and bundle (which never read a backing file) the image.
READ_ONLY = {"info": False, "map": False, "read": False, "layout": False, "bundle": False,
             "check": True, "salvage": True, "scan": True}
FOLLOW_BACKING = ("map", "read")
# Commands that name one image (positional `image`): -f, --image-opts, json: apply to them.
FORMATS = ("qcow2",)


class Parser(argparse.ArgumentParser):
    """argparse with qemu-img's usage exit status (1, not argparse's 2: check's 2 means corruptions)."""

    usage_exit = EXIT_ERROR

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit, f"qdebug: error: {message}\n")


def exits_epilog(command: str) -> str:
    rows = dict(COMMON_EXITS)
    rows.update(COMMAND_EXITS.get(command, ()))
    return "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in sorted(rows.items()))


def prepare_parser(parser: argparse.ArgumentParser, sub) -> None:
    """Every command: its exit codes in --help, -f/--image-opts where it names an image, -U where
    it only reads, the usage exit status."""
    parser.epilog = exits_epilog("")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for name, sp in sub.choices.items():
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        sp.epilog = ((sp.epilog + "\n\n") if sp.epilog else "") + exits_epilog(name)
        sp.usage_exit = USAGE_EXIT.get(name, EXIT_ERROR)
        have = sp._option_string_actions
        names_image = any(a.dest == "image" for a in sp._positionals._group_actions)
        if names_image and "-f" not in have:
            sp.add_argument("-f", dest="image_format", metavar="FMT",
                            help="the image's format: qcow2 (any other is refused, as qemu-img refuses a mismatch)")
        if names_image and "--image-opts" not in have:
            sp.add_argument("--image-opts", action="store_true", help=argparse.SUPPRESS)
        if "-q" not in have:
            sp.add_argument("-q", "--quiet", action="store_true",
                            help="quiet: no warnings or notes on stderr (errors are still said)")
        if name in READ_ONLY and "-U" not in have:
            sp.add_argument("-U", "--force-share", action="store_true",
                            help="read the image even if another process (a running QEMU) writes it: no lock is "
                                 "taken and the results may be transient (as qemu-img -U)")


def add_force_share(sp, *, dry_run_only: bool = False) -> None:
    """-U on a command that plans without writing: no reader's lock, as qemu-img -U (refused where
    the command writes: it needs the write lock)."""
    sp.add_argument("-U", "--force-share", action="store_true",
                    help=("with --dry-run: " if dry_run_only else "")
                    + "plan even if another process (a running QEMU) writes the image: no lock is taken and "
                      "the results may be transient (as qemu-img -U)")


class _QuietStderr:
    """`-q`: standard error without qdebug's warning and note lines (errors pass)."""

    def __init__(self, stream):
        self._stream = stream
        self._line = ""

    def write(self, text: str) -> int:
        self._line += text
        *done, self._line = self._line.split("\n")
        kept = [ln for ln in done if not ln.startswith(("qdebug: warning:", "qdebug: note:"))]
        if kept:
            self._stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def preflight(args):
    """Refusals every command shares, before the command opens anything; returns the locks to
    release when the command is done (a HeldFiles; None where no lock is taken here)."""
    if getattr(args, "quiet", False) and not isinstance(sys.stderr, _QuietStderr):
        sys.stderr = _QuietStderr(sys.stderr)  # type: ignore[assignment]  (main puts it back)
    image = getattr(args, "image", None)
    if image is not None:
        if getattr(args, "image_opts", False):
            raise QcowError("--image-opts is not supported: name the image file itself (qdebug reads qcow2 "
                            "files; backing files follow the image's header or --allow-backing)")
        if image.startswith("json:"):
            raise QcowError("json: image names are not supported: name the image file itself "
                            "(e.g. `qdebug info disk.qcow2`)")
        fmt = getattr(args, "image_format", None)
        if fmt is not None:
            _check_format(image, fmt)
    force_share = getattr(args, "force_share", False)
    if force_share:
        if getattr(args, "dry_run", None) is False:  # replay, repair: they write (qemu-img: -U is read-only)
            raise QcowError(f"force share (-U) only goes with --dry-run: {args.command} takes the write lock")
        where = f"{image}: " if image else ""
        print(f"qdebug: warning: {where}opened without the shared lock (-U): another process may be writing it, "
              "results may be transient", file=sys.stderr)
    if image is None or READ_ONLY.get(args.command) is not False:
        return None
    return _reader_locks(args, image, force_share)


def _check_format(image: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise QcowError(f"{image}: format {fmt!r} is not supported: qdebug reads qcow2 images (-f qcow2)")
    try:
        with open(image, "rb") as f:
            magic = f.read(4)
    except OSError:
        return  # the command says why it cannot open the file, naming it
    if magic != b"QFI\xfb":
        raise QcowError(f"{image}: Image is not in qcow2 format (-f {fmt})")


def _reader_locks(args, image: str, force_share: bool):
    """The locks the command's qemu-img takes (see READ_ONLY), refused in its words while a writer
    holds one of the files: "Could not open 'top.qcow2': Could not open backing file: Failed to get
    shared "write" lock: Is another process using the image [base.qcow2]?". -U holds "consistent
    read" only (`info -U`: nothing)."""
    from ..engine.file.locking import INFO, READER, SHARING, lock_files

    info = args.command == "info"
    if info and force_share:
        return None
    follow = args.command in FOLLOW_BACKING or (info and getattr(args, "backing_chain", False))
    return lock_files(image, perms=INFO if info else SHARING if force_share else READER,
                      backing=follow and not getattr(args, "no_backing", False), each_alone=info)


# ---- standard streams ---------------------------------------------------------------------------
class _ClosedStdout:
    """Stands for a standard output that was closed (`>&-`): the first write is one clear error."""

    encoding = "utf-8"

    def _fail(self, *_a, **_k):
        raise OSError(errno.EBADF, "standard output is closed", "<stdout>")

    write = writelines = _fail

    def flush(self) -> None:
        pass  # nothing was written; Python's flush at exit must not fail

    @property
    def buffer(self):
        return self

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fail()


def guard_streams() -> None:
    """Closed standard descriptors get /dev/null, so no image or log opened later takes their
    numbers (a print would write into it); a closed stdout stays an error at its first write."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                sys.stdout = _ClosedStdout()  # type: ignore[assignment]
            elif fd == 2:
                sys.stderr = open(2, "w", closefd=False)
            elif fd == 0:
                sys.stdin = open(0, "r", closefd=False)


def stream_error(e: OSError) -> str | None:
    """The one-line message for a failed write to standard output (None: not about stdout)."""
    if e.errno == errno.EBADF and e.filename == "<stdout>":
        return "standard output is closed"
    if e.filename is None and e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EBADF):
        return f"standard output: {e.strerror}"
    return None


def quiet_broken_pipe() -> None:
    """After EPIPE: further writes (Python's own flush at exit) go nowhere, without a message."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def require_terminal(what: str) -> None:
    """The TUI needs a terminal on both stdin and stdout: in a pipeline or under cron it would wait
    for keys that never come and write escape codes into the pipe. Refuse in one line instead."""
    for name, stream in (("standard input", sys.stdin), ("standard output", sys.stdout)):
        try:
            tty = stream is not None and stream.isatty()
        except (ValueError, OSError):
            tty = False
        if not tty:
            raise QcowError(f"{what} is interactive and {name} is not a terminal; for scripts use "
                            "`qdebug info`, `map`, `check`, `replay`... (`qdebug --help` lists them)")
