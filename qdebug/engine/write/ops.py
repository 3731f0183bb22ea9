"""Guest operations as data: what one qemu-io command asks of the block layer.

The write engine runs these; the qemu-io *syntax* that produces them lives in `qdebug.trace`.
`text` and `lineno` say where a command came from (a trace line), for messages and logs.

qemu-io has more commands than the block layer has operations: `writev` and `aio_write` are a
`write` of the sum of their buffers (one request, each buffer filled with the same pattern),
`readv` and `aio_read` a `read`; `verb` keeps the name the trace used. `aio_*` requests run in
order here; qemu-io submits them concurrently, which can only change which host clusters they
get, never the guest data. qemu-io reports an aio failure (an I/O error, a failed pattern check)
but the command itself succeeds (`asynchronous`).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WRITE_PATTERN = 0xCD  # qemu-io's pattern when -P is not given


@dataclass
class Command:
    """One guest operation. Treated as immutable; not declared frozen because a frozen dataclass
    costs four times as much to make, once per line of a trace (compiled, 0.5 us against 2 us)."""

    op: str  # 'write' | 'read' | 'discard' | 'flush' | 'quit' (stops the trace, as in qemu-io)
    offset: int = 0
    length: int = 0
    pattern: int | None = None
    zero: bool = False
    unmap: bool = False
    compressed: bool = False
    quiet: bool = False
    text: str = ""
    lineno: int = 0
    verb: str = ""  # the qemu-io command when it is not `op` itself: writev, readv, aio_write, aio_read
    lengths: tuple[int, ...] = ()  # the buffers of writev/readv/aio_*; they add up to `length`
    fua: bool = False  # -f: Force Unit Access; QEMU flushes the image after the write
    no_fallback: bool = False  # -n (with -z): ENOTSUP instead of writing zeroes as data
    pattern_offset: int = 0  # read -s: the pattern check starts this far into the read
    pattern_count: int = -1  # read -l: bytes checked (-1: to the end of the read)
    source: bytes | None = None  # write -s FILE: the file's first `length` bytes, repeated
    source_file: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def fill(self) -> int:
        """The byte a data write stores (qemu-io's default 0xcd without -P)."""
        return DEFAULT_WRITE_PATTERN if self.pattern is None else self.pattern

    @property
    def name(self) -> str:
        """The qemu-io command this came from."""
        return self.verb or self.op

    @property
    def failure_name(self) -> str:
        """The name qemu-io prints before ' failed: ' (its aio_read reports as 'readv')."""
        return "readv" if self.verb == "aio_read" else self.name

    @property
    def asynchronous(self) -> bool:
        """An aio_* request: qemu-io prints its failure and goes on; the command itself succeeds."""
        return self.verb.startswith("aio_")

    @property
    def flushes(self) -> bool:
        """A flush, or a write with -f (QEMU emulates FUA with a flush after the write)."""
        return self.op == "flush" or self.fua

    @property
    def check_offset(self) -> int:
        """Where a read's pattern check starts (read -s)."""
        return self.offset + self.pattern_offset

    @property
    def check_length(self) -> int:
        """How many bytes a read's pattern check compares (read -l)."""
        return self.length - self.pattern_offset if self.pattern_count < 0 else self.pattern_count

    @property
    def changes_image(self) -> bool:
        """Writes and discards change the image; reads (checks), flushes and quit do not."""
        return self.op == "write" or self.op == "discard"

    def payload(self, offset: int, n: int) -> bytes:
        """The guest bytes a data write stores at guest [offset, offset + n) (an engine Fill):
        the pattern byte, or write -s's file data repeated from the start of the write."""
        src = self.source
        if src is None or not src:
            return bytes([self.fill]) * n
        start = (offset - self.offset) % len(src)
        reps = -(-(start + n) // len(src))
        return (src * reps)[start:start + n]

    @property
    def source_text(self) -> str:
        """The command as its trace line spelled it (comment removed), or normalised."""
        return self.text.split("#", 1)[0].strip() if self.text else self.to_qemu_io()

    def to_qemu_io(self) -> str:
        """The command as qemu-io reads it (normalised spelling)."""
        if self.op == "flush" or self.op == "quit":
            return self.op
        opts = []
        if self.quiet:
            opts.append("-q")
        if self.fua:
            opts.append("-f")
        if self.pattern is not None and not self.zero:
            opts.append(f"-P 0x{self.pattern:x}")
        if self.op == "read" and self.pattern is not None:
            if self.pattern_offset:
                opts.append(f"-s {self.pattern_offset}")
            if self.pattern_count >= 0:
                opts.append(f"-l {self.pattern_count}")
        if self.zero:
            opts.append("-z")
        if self.unmap:
            opts.append("-u")
        if self.no_fallback:
            opts.append("-n")
        if self.compressed:
            opts.append("-c")
        if self.source is not None:
            opts.append(f"-s {self.source_file}")
        sizes = [str(n) for n in self.lengths] if self.lengths else [str(self.length)]
        return " ".join([self.name, *opts, str(self.offset), *sizes])
