"""qemu-io's number syntax (cvtnum / qemu_strtosz): decimal or 0x hex, optional unit suffix."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_NUM = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)([bBkKmMgGtTpPeE]?)$")


class SyntaxProblem(ValueError):
    """A malformed number or command; the message says what and where in the text."""


def is_plain_decimal(text: str) -> bool:
    """Digits only, below 2**63 for sure: the usual spelling, `int()` reads it as parse_size does."""
    return text.isdigit() and text.isascii() and len(text) < 19


def parse_size(text: str) -> int:
    """`4k` -> 4096, `0x800` -> 2048, `1M` -> 1048576 (qemu-io accepts the same spellings)."""
    if is_plain_decimal(text):  # the usual case
        return int(text)
    m = _NUM.match(text.strip())
    if not m:
        raise SyntaxProblem(f"invalid number {shown(text)}")
    digits, suffix = m.groups()
    hexa = digits[:2].lower() == "0x"
    # A number of thousands of digits is out of range: refused before int() reads it (Python
    # refuses past 4300 digits, and reading it is quadratic anyway). qemu-io: "argument too large".
    if len((digits[2:] if hexa else digits).lstrip("0")) > (16 if hexa else 19):
        raise SyntaxProblem(f"number {shown(text)} is out of range")
    value = int(digits, 16) if hexa else int(digits, 10)
    value *= _SUFFIX[suffix.lower()]
    if value >= 1 << 63:
        raise SyntaxProblem(f"number {shown(text)} is out of range")
    return value


def shown(text: str, limit: int = 40) -> str:
    """A number as messages quote it: a runaway one cut short (the message stays one line)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
