"""Guest operations as data: what one qemu-io command asks of the block layer.

The write engine runs these; the qemu-io *syntax* that produces them lives in `qdebug.trace`.
`text` and `lineno` say where a command came from (a trace line), for messages and logs.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WRITE_PATTERN = 0xCD  # qemu-io's pattern when -P is not given


@dataclass
class Command:
    """One guest operation. Treated as immutable; not declared frozen because a frozen dataclass
    costs four times as much to make, once per line of a trace (compiled, 0.5 us against 2 us)."""

    op: str  # 'write' | 'read' | 'discard' | 'flush'
    offset: int = 0
    length: int = 0
    pattern: int | None = None
    zero: bool = False
    unmap: bool = False
    compressed: bool = False
    quiet: bool = False
    text: str = ""
    lineno: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def fill(self) -> int:
        """The byte a data write stores (qemu-io's default 0xcd without -P)."""
        return DEFAULT_WRITE_PATTERN if self.pattern is None else self.pattern

    @property
    def changes_image(self) -> bool:
        """Writes and discards change the image; reads (checks) and flushes do not."""
        return self.op == "write" or self.op == "discard"

    @property
    def source_text(self) -> str:
        """The command as its trace line spelled it (comment removed), or normalised."""
        return self.text.split("#", 1)[0].strip() if self.text else self.to_qemu_io()

    def to_qemu_io(self) -> str:
        """The command as qemu-io reads it (normalised spelling)."""
        if self.op == "flush":
            return "flush"
        opts = []
        if self.quiet:
            opts.append("-q")
        if self.pattern is not None:
            opts.append(f"-P 0x{self.pattern:x}")
        if self.zero:
            opts.append("-z")
        if self.unmap:
            opts.append("-u")
        if self.compressed:
            opts.append("-c")
        return " ".join([self.op, *opts, str(self.offset), str(self.length)])
