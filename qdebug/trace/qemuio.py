"""qemu-io 7.2's command table: every command `help` lists, its alias, argument counts and usage,
and what qdebug does with it.

`RUN` commands change or check image state and become engine Commands; `IGNORE` commands only
print (their arguments are still checked as qemu-io checks them, so a line qemu-io fails fails
here too); `REFUSE` commands are ones qemu-io runs but qdebug cannot reproduce (they resize the
image, reopen or close it, crash the process or need blkdebug): a trace that uses one is refused
before anything is written, naming the command.
"""

from __future__ import annotations

from typing import Final

RUN: Final = "run"
IGNORE: Final = "ignore"
REFUSE: Final = "refuse"


class Spec:
    """One qemu-io command (cmdinfo_t): argmax -1 means no upper limit, as in qemu-io."""

    __slots__ = ("name", "alias", "argmin", "argmax", "args", "oneline", "kind", "why")

    def __init__(self, name: str, alias: str, argmin: int, argmax: int, args: str, oneline: str, kind: str,
                 why: str = ""):
        self.name, self.alias, self.argmin, self.argmax = name, alias, argmin, argmax
        self.args, self.oneline, self.kind, self.why = args, oneline, kind, why

    @property
    def usage(self) -> str:
        """The line qemu-io prints for a usage error."""
        return f"{self.name} {self.args} -- {self.oneline}" if self.args else f"{self.name} -- {self.oneline}"

    def count_problem(self, typed: str, nargs: int) -> str:
        """qemu-io's message when the number of words after the command is wrong, else ""."""
        if nargs >= self.argmin and (self.argmax == -1 or nargs <= self.argmax):
            return ""
        if self.argmax == -1:
            return f"bad argument count {nargs} to {typed}, expected at least {self.argmin} arguments"
        if self.argmin == self.argmax:
            return f"bad argument count {nargs} to {typed}, expected {self.argmin} arguments"
        return f"bad argument count {nargs} to {typed}, expected between {self.argmin} and {self.argmax} arguments"


SPECS: Final = (
    Spec("abort", "", 0, 0, "", "simulate a program crash using abort(3)", REFUSE,
         "it crashes qemu-io with unwritten metadata, which qdebug does not reproduce"),
    Spec("aio_flush", "", 0, 0, "", "completes all outstanding aio requests", IGNORE),
    Spec("aio_read", "", 2, -1, "[-Ciqv] [-P pattern] off len [len..]", "asynchronously reads a number of bytes",
         RUN),
    Spec("aio_write", "", 2, -1, "[-Cfiquz] [-P pattern] off len [len..]", "asynchronously writes a number of bytes",
         RUN),
    Spec("alloc", "a", 1, 2, "offset [count]", "checks if offset is allocated in the file", IGNORE),
    Spec("break", "", 2, 2, "event tag", "sets a breakpoint on event and tags the stopped request as tag", REFUSE,
         "breakpoints need a blkdebug node"),
    Spec("close", "c", 0, 0, "", "close the current open file", REFUSE,
         "a trace runs on the one image qdebug opened"),
    Spec("discard", "d", 2, -1, "[-Cq] off len", "discards a number of bytes at a specified offset", RUN),
    Spec("flush", "f", 0, 0, "", "flush all in-core file state to disk", RUN),
    Spec("help", "?", 0, 1, "[command]", "help for one or all commands", IGNORE),
    Spec("info", "i", 0, 0, "", "prints information about the current file", IGNORE),
    Spec("length", "l", 0, 0, "", "gets the length of the current file", IGNORE),
    Spec("map", "", 0, 0, "", "prints the allocated areas of a file", IGNORE),
    Spec("open", "o", 1, -1, "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
         "open the file specified by path", REFUSE, "a trace runs on the one image qdebug opened"),
    Spec("quit", "q", -1, -1, "", "exit the program", RUN),
    Spec("read", "r", 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
         "reads a number of bytes at a specified offset", RUN),
    Spec("readv", "", 2, -1, "[-Cqv] [-P pattern] off len [len..]", "reads a number of bytes at a specified offset",
         RUN),
    Spec("remove_break", "", 1, 1, "tag", "remove a breakpoint by tag", REFUSE, "breakpoints need a blkdebug node"),
    Spec("reopen", "", 0, -1, "[(-r|-w)] [-c cache] [-o options]", "reopens an image with new options", REFUSE,
         "qdebug runs every command with the options the image was opened with"),
    Spec("resume", "", 1, 1, "tag", "resumes the request tagged as tag", REFUSE, "breakpoints need a blkdebug node"),
    Spec("sigraise", "", 1, 1, "signal", "raises a signal", REFUSE,
         "a signal may kill qemu-io with unwritten metadata, which qdebug does not reproduce"),
    Spec("sleep", "", 1, 1, "", "waits for the given value in milliseconds", IGNORE),
    Spec("truncate", "t", 1, 3, "[-m prealloc_mode] off", "truncates the current file at the given offset", REFUSE,
         "qdebug does not resize images"),
    Spec("wait_break", "", 1, 1, "tag", "waits for the suspension of a request", REFUSE,
         "breakpoints need a blkdebug node"),
    Spec("write", "w", 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len",
         "writes a number of bytes at a specified offset", RUN),
    Spec("writev", "", 2, -1, "[-Cfq] [-P pattern] off len [len..]", "writes a number of bytes at a specified offset",
         RUN),
)
BY_NAME: Final = {s.name: s for s in SPECS} | {s.alias: s for s in SPECS if s.alias}
VMSTATE_REFUSAL: Final = "qdebug does not model the VM state area (beyond the disk, through a grown L1 table)"

# getopt option strings, as each command's handler passes them
OPTSTRINGS: Final = {"read": "bCl:pP:qs:v", "readv": "CP:qv", "write": "bcCfnpP:qs:uz", "writev": "CfqP:",
                     "aio_read": "CP:iqv", "aio_write": "CfiqP:uz", "discard": "Cq"}
