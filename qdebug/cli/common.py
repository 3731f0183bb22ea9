"""What every `qdebug` command shares: number arguments, one-line messages, warnings on stderr."""

from __future__ import annotations

import argparse
import sys


def size_arg(text: str) -> int:
    """An argparse type: qemu-io's number syntax (`4k`, `0x800`, `1M`)."""
    from ..trace.syntax import SyntaxProblem, parse_size

    try:
        return parse_size(text)
    except SyntaxProblem as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def human_size(n: int) -> str:
    """QEMU's size_to_str: three significant digits, switching unit from 1000 of the smaller one."""
    import math

    i = (math.frexp(n / (1000.0 / 1024.0))[1] - 1) // 10 if n else 0
    i = max(0, min(i, 6))
    return f"{n / (1 << (10 * i)):0.3g} {['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'][i]}B"


def one_line(text: str) -> str:
    """Messages quote names taken from the image (backing names may hold newlines or escapes):
    keep the promise of one line per message, whatever the name. A byte that was not UTF-8 (read
    with surrogateescape) shows as the byte, \\xff."""
    return "".join(c if c.isprintable() else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else repr(c)[1:-1] for c in text)


def warn(warnings) -> None:
    for w in warnings:
        print(f"qdebug: warning: {one_line(w)}", file=sys.stderr)
