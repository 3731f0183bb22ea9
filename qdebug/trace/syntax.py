"""qemu-io 7.2's argument syntax: words, GNU getopt, numbers (cvtnum) and pattern bytes (strtol).

Rebuilt from QEMU's behaviour (util/cutils.c do_strtosz, qemu-io-cmds.c, glibc getopt) and checked
against qemu-io 7.2 in tests/trace: a line qemu-io accepts parses here to the same values, a line
it rejects is a SyntaxProblem with qemu-io's own message.

- Words are separated by single spaces only (qemu-io's breakline): a tab is part of a word.
- Options follow glibc's getopt: bundled (`-zu`), an argument attached or in the next word
  (`-P0x5`, `-P 0x5`), options may come after the positional arguments (getopt permutes them),
  `--` ends the options, and the first bad option stops the parse.
- Numbers (cvtnum): decimal with an optional fraction and a B/K/M/G/T/P/E suffix (any case,
  binary multiples, the fraction rounded half up: `1.5k` = 1536), or 0x hex (a suffix is
  deprecated but accepted, no fraction); leading C whitespace and `+` are skipped; the value must
  fit in an int64.
"""

from __future__ import annotations

import re
from typing import Final

_SUFFIX: Final = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_CSPACE: Final = " \t\n\v\f\r"  # C isspace() in the C locale
_U64: Final = 1 << 64
_DBL_MIN: Final = 2.2250738585072014e-308  # below it glibc's strtod reports ERANGE (underflow)
_DEC: Final = re.compile(r"[+-]?[0-9]+")
_HEX: Final = re.compile(r"[+-]?(?:0[xX])?([0-9a-fA-F]+)")
_FRACTION: Final = re.compile(r"\.[0-9]+(?:[eE][+-]?[0-9]+)?")
_STRTOL: Final = re.compile(r"([+-]?)(?:(0[xX])([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")


class SyntaxProblem(ValueError):
    """A line qemu-io rejects (its message), or one it accepts that qdebug cannot run (Unsupported)."""


class Unsupported(SyntaxProblem):
    """A command or option qemu-io 7.2 accepts but qdebug does not reproduce: refused before any write."""


def is_plain_decimal(text: str) -> bool:
    """Digits only, below 2**63 for sure: the usual spelling, `int()` reads it as parse_size does."""
    return text.isdigit() and text.isascii() and len(text) < 19


def _strtou64(text: str, base: int) -> tuple[int, int, bool]:
    """C strtoull(text, &end, base) -> (value, end index, overflow); end 0 when nothing was read."""
    i = len(text) - len(text.lstrip(_CSPACE))
    m = (_DEC if base == 10 else _HEX).match(text, i)
    if m is None:
        return 0, 0, False
    digits = (m.group(0) if base == 10 else m.group(1)).lstrip("+-")
    if len(digits.lstrip("0")) > (20 if base == 10 else 16):  # past 2**64 for sure: never int() it
        return _U64 - 1, m.end(), True  # (a runaway number of thousands of digits: Python refuses those)
    magnitude = int(digits.lstrip("0") or "0", base)
    negative = m.group(0).startswith("-")
    return (_U64 - magnitude) % _U64 if negative else magnitude, m.end(), magnitude >= _U64


def _fraction(text: str, at: int) -> tuple[float, int, bool]:
    """strtod at the '.' of `text[at:]` -> (value, end index, ok). Not ok: nothing read (end is
    `at`) or an underflow (ERANGE, end after the digits), as glibc reports them."""
    m = _FRACTION.match(text, at)
    if m is None:
        return 0.0, at, False
    value = float("0" + m.group(0))
    mantissa = m.group(0).replace("E", "e").split("e")[0]
    if value < _DBL_MIN and mantissa.strip(".0"):
        return value, m.end(), False
    return value, m.end(), True


def _strtosz(text: str) -> tuple[int, int]:
    """do_strtosz -> (value or -errno, where parsing stopped)."""
    val, end, overflow = _strtou64(text, 10)
    if end == 0:
        return -22, 0
    if overflow:
        return -34, end
    if "-" in text[:end]:
        return -22, 0
    valf = 0
    at = end
    if val == 0 and text[at:at + 1] in ("x", "X"):
        val, at, overflow = _strtou64(text, 16)
        if overflow:
            return -34, at
        if text[at:at + 1] == ".":
            return -22, 0
    elif text[at:at + 1] == ".":
        fraction, at, ok = _fraction(text, at)
        if not ok:
            at += 1  # strtod failed: QEMU steps one character past where it stopped
        elif "e" in text[end:at] or "E" in text[end:at]:
            return -22, 0
        else:
            scaled = fraction * 18446744073709551616.0
            valf = int(scaled) if scaled < 18446744073709551616.0 else 0  # the (uint64_t) cast on x86-64
    shift = _SUFFIX.get(text[at:at + 1].upper(), -1) if at < len(text) else -1
    if shift >= 0:
        at += 1
    else:
        shift = 0
    if shift == 0:
        if valf:
            return -22, 0
    else:
        frac = valf << shift  # 64.64 fixed point times the multiplier, rounded half up
        val = (val << shift) + (frac >> 64) + ((frac >> 63) & 1)
        if val >= _U64:
            return -34, at
    return val, at


def strtosz64(text: str) -> int:
    """qemu_strtosz over the whole uint64 range (QemuOpts' sizes): the value or -22 / -34."""
    value, at = _strtosz(text)
    return -22 if at != len(text) else value


def strtosz(text: str) -> int:
    """qemu-io's cvtnum: the value, or -22 (EINVAL) / -34 (ERANGE) as QEMU returns them."""
    value, at = _strtosz(text)
    if at != len(text):
        return -22  # trailing characters make any result EINVAL
    if value >= 1 << 63:
        return -34
    return value


def parse_size(text: str) -> int:
    """cvtnum: `4k` -> 4096, `0x800` -> 2048, `1.5M`; qemu-io's message for anything else."""
    if is_plain_decimal(text):  # the usual case
        return int(text)
    value = strtosz(text)
    if value == -22:
        raise SyntaxProblem(f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {shown(text)}")
    if value < 0:
        raise SyntaxProblem(f"Parsing error: argument too large -- {shown(text)}")
    return value


def shown(text: str, limit: int = 40) -> str:
    """A word as messages quote it: qemu-io's text, a runaway one cut short (one short line)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def strtol(text: str) -> int | None:
    """C strtol(text, &end, 0) where all of `text` must be read: the value, or None."""
    body = text.lstrip(_CSPACE)
    if not body:
        return 0 if not text else None  # nothing read: end == text, so only "" passes
    m = _STRTOL.match(body)
    if m is None or m.end() != len(body):
        return None
    sign, _x, hexd, octd, decd = m.groups()
    digits, base = (hexd, 16) if hexd is not None else (octd, 8) if octd is not None else (decd, 10)
    if len(digits.lstrip("0")) > 22:  # past C's long for sure: strtol saturates (never int() it)
        return -(1 << 63) if sign == "-" else (1 << 63) - 1
    value = int(digits.lstrip("0") or "0", base)
    return -value if sign == "-" else value


_PATTERNS: Final = {f"0x{b:02x}": b for b in range(256)}  # the usual spelling, looked up


def parse_pattern(text: str) -> int:
    """A pattern byte as qemu-io's parse_pattern reads it (strtol base 0, then 0..255)."""
    value = _PATTERNS.get(text)
    if value is not None:
        return value
    value = strtol(text)
    if value is None or value < 0 or value > 0xFF:
        raise SyntaxProblem(f"{shown(text)} is not a valid pattern byte")
    return value


def getopt(name: str, args: list[str], optstring: str) -> tuple[list[tuple[str, str]], list[int], str]:
    """glibc getopt over a command's words (argv[1:]) with permutation.

    -> (options in order as (letter, argument or ""), the positional words' indices in order,
    error): the options up to the first bad one, and getopt's message for it ("" if none).
    """
    opts: list[tuple[str, str]] = []
    positional: list[int] = []
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--":
            positional.extend(range(i, len(args)))
            break
        if len(word) < 2 or word[0] != "-":
            positional.append(i - 1)
            continue
        j = 1
        while j < len(word):
            ch = word[j]
            j += 1
            at = optstring.find(ch)
            if ch == ":" or at < 0:
                return opts, positional, f"{name}: invalid option -- '{ch}'"
            if optstring[at + 1:at + 2] != ":":
                opts.append((ch, ""))
                continue
            if j < len(word):
                opts.append((ch, word[j:]))
            elif i < len(args):
                opts.append((ch, args[i]))
                i += 1
            else:
                return opts, positional, f"{name}: option requires an argument -- '{ch}'"
            break
    return opts, positional, ""
