"""qemu-io's command syntax -> engine `Command`s: the subset of qemu-io's syntax a write trace uses.

`write [-q] [-P pattern] [-z [-u]] [-c] OFF LEN`, `discard [-q] OFF LEN`, `read [-q] [-P pattern] OFF LEN`
and `flush`, with qemu-io's number syntax (`parse_size`). The same text drives `qemu-io` (comments
removed), so option rules follow qemu-io: `-u` needs `-z`, `-z` excludes `-P`, a pattern is one byte
written as C's strtol(…, 0) reads it (decimal, 0x hex, leading-0 octal).
"""

from __future__ import annotations

import re
from typing import Iterable

from ..engine.write.ops import Command
from .syntax import SyntaxProblem, is_plain_decimal, parse_size, shown

_OPS = ("write", "read", "discard", "flush")
_ALIASES = {"w": "write", "r": "read"}
# Options that take no argument, per command; -P takes one.
_FLAGS = {"write": "qzuc", "read": "q", "discard": "q", "flush": ""}
_PATTERN = re.compile(r"^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


_PATTERNS = {f"0x{b:02x}": b for b in range(256)}  # the usual spelling, looked up


def parse_pattern(text: str) -> int:
    """A pattern byte as qemu-io's parse_pattern (strtol base 0, 0..255)."""
    value = _PATTERNS.get(text)
    if value is not None:
        return value
    if not _PATTERN.match(text):
        raise SyntaxProblem(f"{shown(text)} is not a valid pattern byte")
    if len((text[2:] if text[:2].lower() == "0x" else text).lstrip("0")) > 3:  # before int(): any length
        raise SyntaxProblem(f"{shown(text)} is not a valid pattern byte (0..255)")
    value = int(text, 16) if text[:2].lower() == "0x" else int(text, 8) if text.startswith("0") else int(text)
    if value > 0xFF:
        raise SyntaxProblem(f"{shown(text)} is not a valid pattern byte (0..255)")
    return value


# The part of a line before its two numbers -> the command it makes (options checked once): a
# trace repeats a few spellings ("write -q -P 0xd1", "discard -q") a hundred thousand times.
_HEADS: dict[str, Command] = {}


def parse_line(text: str, lineno: int = 0) -> Command | None:
    """One trace line -> Command; None for blank and comment lines (`#` to end of line)."""
    parts = text.rsplit(None, 2)
    if len(parts) == 3:
        head, off, length = parts
        known = _HEADS.get(head)
        if known is not None and is_plain_decimal(off) and is_plain_decimal(length):
            return Command(known.op, int(off), int(length), known.pattern, known.zero, known.unmap,
                           known.compressed, known.quiet, text.rstrip("\n"), lineno)
    cmd = _parse_line(text, lineno)
    if cmd is not None and len(parts) == 3 and is_plain_decimal(parts[1]) and is_plain_decimal(parts[2]) \
            and (cmd.offset, cmd.length) == (int(parts[1]), int(parts[2])):
        # the numbers were the command's two arguments: any other two make the same command
        if len(_HEADS) > 1024:
            _HEADS.clear()
        _HEADS[parts[0]] = cmd
    return cmd


def _parse_line(text: str, lineno: int) -> Command | None:
    words = (text.split("#", 1)[0] if "#" in text else text).split()
    if not words:
        return None
    op = _ALIASES.get(words[0], words[0])
    if op not in _OPS:
        raise SyntaxProblem(f"unknown command {words[0]!r} (expected write, read, discard or flush)")
    flags: set[str] = set()
    pattern: int | None = None
    args: list[str] = []
    i = 1
    while i < len(words):
        w = words[i]
        if w.startswith("-") and len(w) > 1 and not args:
            j = 1
            while j < len(w):
                ch = w[j]
                if ch == "P" and op in ("write", "read"):
                    rest = w[j + 1:]
                    if not rest:
                        i += 1
                        if i >= len(words):
                            raise SyntaxProblem(f"{op}: option -P needs a pattern byte")
                        rest = words[i]
                    pattern = parse_pattern(rest)
                    break
                if ch not in _FLAGS[op]:
                    raise SyntaxProblem(f"{op}: unsupported option -{ch}")
                flags.add(ch)
                j += 1
        else:
            args.append(w)
        i += 1
    if op == "flush":
        if args:
            raise SyntaxProblem("flush takes no arguments")
        return Command("flush", text=text.rstrip("\n"), lineno=lineno)
    if len(args) != 2:
        raise SyntaxProblem(f"{op} needs OFFSET and LENGTH, got {len(args)} argument(s)")
    try:
        offset = parse_size(args[0])
    except SyntaxProblem as e:
        raise SyntaxProblem(f"{op}: offset: {e}") from None
    try:
        length = parse_size(args[1])
    except SyntaxProblem as e:
        raise SyntaxProblem(f"{op}: length: {e}") from None
    if "u" in flags and "z" not in flags:
        raise SyntaxProblem("write: -u requires -z")
    if "z" in flags and pattern is not None:
        raise SyntaxProblem("write: -z and -P cannot be used together")
    if "z" in flags and "c" in flags:
        raise SyntaxProblem("write: -z and -c together are not supported")
    return Command(op, offset, length, pattern, "z" in flags, "u" in flags, "c" in flags, "q" in flags,
                   text.rstrip("\n"), lineno)


def parse_trace(lines: Iterable[str], source: str) -> list[Command]:
    """All commands of a trace; a bad line raises SyntaxProblem('SOURCE:LINE: reason')."""
    out: list[Command] = []
    for n, line in enumerate(lines, 1):
        try:
            cmd = parse_line(line, n)
        except SyntaxProblem as e:
            raise SyntaxProblem(f"{source}:{n}: {e}") from None
        if cmd is not None:
            out.append(cmd)
    return out
