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
        raise SyntaxProblem(f"invalid number {text!r}")
    digits, suffix = m.groups()
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)
    value *= _SUFFIX[suffix.lower()]
    if value >= 1 << 63:
        raise SyntaxProblem(f"number {text!r} is out of range")
    return value
