"""qemu-io trace lines -> engine `Command`s, with qemu-io 7.2's meaning for every command and option.

The same text drives `qemu-io IMAGE < TRACE` (qdebug adds `#` comments; strip them for qemu-io).
Each line goes through what qemu-io does with it, in qemu-io's order: the command table
(`qemuio.py`: name or alias, argument count), glibc getopt, then the command's own checks
(`-u requires -z`, length limits, sector alignment for -c, pattern check ranges...). A line
qemu-io rejects is a SyntaxProblem with qemu-io's message; a line it accepts is a Command, or
None for lines that change and check nothing (comments, `help`, `map`, `aio_flush`, `sleep`,
`aio_* -i`...), or `Unsupported` for what qdebug cannot reproduce (`truncate`, `write -b`, ...).

Purely cosmetic options are accepted and ignored: -q, -C, -v (qemu-io's output), -p. What the
others mean here: -P the pattern (written, or checked by reads), -z [-u] [-n] zero writes (-n:
fail with ENOTSUP where QEMU would fall back to writing zeroes), -c compressed, -f FUA (a flush
after the write), -s FILE (write: the file's data; read: where the check starts), -l (how much
the check covers).
"""

from __future__ import annotations

from typing import Final, Iterable, Iterator

from ..engine.write.ops import Command
from .qemuio import BY_NAME, IGNORE, OPTSTRINGS, REFUSE, VMSTATE_REFUSAL, Spec
from .syntax import SyntaxProblem, Unsupported, getopt, is_plain_decimal, parse_pattern, parse_size, strtol

__all__ = ["Command", "SyntaxProblem", "Unsupported", "parse_line", "parse_pattern", "parse_trace", "sleep_ms"]

MAX_BYTES = 2147483136  # BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to whole sectors


def _words(text: str, strict: bool = False) -> list[str]:
    """qemu-io's breakline (single spaces), after the line's newline and (unless strict) qdebug's
    `#` comment go."""
    body = text.split("#", 1)[0] if not strict and "#" in text else text
    if body.endswith("\n"):
        body = body[:-1]
    return [w for w in body.split(" ") if w]


def _number(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except SyntaxProblem as e:
        raise SyntaxProblem(f"{name}: {e}") from None


def _usage(spec: Spec) -> SyntaxProblem:
    return SyntaxProblem(f"{spec.name}: wrong arguments; usage: {spec.usage}")


def _options(spec: Spec, typed: str, args: list[str]) -> tuple[list[tuple[str, str]], list[int], str]:
    """getopt over the arguments -> (options, positional words as indices into args, error)."""
    return getopt(typed, args, OPTSTRINGS[spec.name])


def _bad_option(spec: Spec, error: str) -> SyntaxProblem:
    return SyntaxProblem(f"{error}; usage: {spec.usage}")


def _iovec(name: str, words: list[str]) -> tuple[int, ...]:
    """create_iovec: each buffer length, and their sum, within BDRV_REQUEST_MAX_BYTES."""
    sizes: list[int] = []
    total = 0
    for w in words:
        n = _number(name, w)
        if n > MAX_BYTES:
            raise SyntaxProblem(f"{name}: Argument '{w}' exceeds maximum size {MAX_BYTES}")
        if total > MAX_BYTES - n:
            raise SyntaxProblem(f"{name}: The total number of bytes exceed the maximum size {MAX_BYTES}")
        sizes.append(n)
        total += n
    return tuple(sizes)


def _aligned(name: str, offset: int, count: int) -> None:
    if offset % 512:
        raise SyntaxProblem(f"{name}: {offset} is not a sector-aligned value for 'offset'")
    if count % 512:
        raise SyntaxProblem(f"{name}: {count} is not a sector-aligned value for 'count'")


def _read_source(path: str, count: int) -> bytes:
    """write -s: the file's first `count` bytes (qemu-io repeats them to fill the buffer)."""
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as e:
        raise SyntaxProblem(f"write -s: {path}: {e.strerror}") from None
    if not data:  # (also for a zero-length write: qemu-io reads 0 bytes and finds "nothing")
        raise SyntaxProblem(f"write -s: {path}: file is empty")
    return data


# Each handler returns (command or None, cache alignment): the alignment is 0 when the line must
# not be remembered by parse_line's fast path, else what its numbers must be a multiple of.
Parsed = tuple[Command | None, int]


def _write(spec: Spec, typed: str, args: list[str], text: str, lineno: int) -> Parsed:
    opts, where, error = _options(spec, typed, args)
    flags = ""
    pattern: int | None = None
    source_file = ""
    for ch, arg in opts:
        if ch == "P":
            pattern = parse_pattern(arg)
        elif ch == "s":
            source_file = arg
        flags += ch
    if error:
        raise _bad_option(spec, error)
    if len(where) != 2:
        raise _usage(spec)
    b, c, z, s = "b" in flags, "c" in flags, "z" in flags, "s" in flags
    if b and z:
        raise SyntaxProblem("write: -b and -z cannot be specified at the same time")
    if "f" in flags and (b or c):
        raise SyntaxProblem("write: -f and -b or -c cannot be specified at the same time")
    if "n" in flags and not z:
        raise SyntaxProblem("write: -n requires -z to be specified")
    if "u" in flags and not z:
        raise SyntaxProblem("write: -u requires -z to be specified")
    if int(z) + int("P" in flags) + int(s) > 1:
        raise SyntaxProblem("write: Only one of -z, -P, and -s can be specified at the same time")
    offset = _number("write", args[where[0]])
    count = _number("write", args[where[1]])
    if count > MAX_BYTES and "n" not in flags:
        raise SyntaxProblem(f"write: length cannot exceed {MAX_BYTES} without -n, given {args[where[1]]}")
    if b or c:
        _aligned("write", offset, count)
    source = _read_source(source_file, count) if s else None
    if b:
        raise Unsupported(f"write -b (write to the VM state) is not supported: {VMSTATE_REFUSAL}")
    cmd = Command("write", offset, count, None if z else pattern, z, "u" in flags, c and not z, "q" in flags,
                  text.rstrip("\n"), lineno, "", (), "f" in flags, "n" in flags, 0, -1, source, source_file)
    return cmd, (0 if s else 512 if c else 1) if where == [len(args) - 2, len(args) - 1] else 0


def _vector_options(spec: Spec, typed: str, args: list[str]) -> tuple[str, int | None, list[int]]:
    """The options of writev/readv/aio_*, handled in getopt's order as qemu-io handles them:
    -> (option letters, pattern, positional indices); letters "i" alone for aio -i, which ends
    the command there as a no-op (a request counted as invalid: nothing is read or written)."""
    opts, where, error = _options(spec, typed, args)
    flags = ""
    pattern: int | None = None
    for ch, arg in opts:
        if ch == "i":
            return "i", None, []
        if ch == "P":
            pattern = parse_pattern(arg)
        flags += ch
    if error:
        raise _bad_option(spec, error)
    if len(where) < 2:
        raise _usage(spec)
    return flags, pattern, where


def _vector_write(spec: Spec, typed: str, args: list[str], text: str, lineno: int) -> Parsed:
    """writev and aio_write: one write request of the buffers' total length."""
    flags, pattern, where = _vector_options(spec, typed, args)
    if flags == "i":
        return None, 0
    z = "z" in flags
    if z and len(where) != 2:
        raise SyntaxProblem(f"{spec.name}: -z supports only a single length parameter")
    if "u" in flags and not z:
        raise SyntaxProblem(f"{spec.name}: -u requires -z to be specified")
    offset = _number(spec.name, args[where[0]])
    if z:  # aio_write -z: blk_aio_pwrite_zeroes, no length limit here (-P is accepted and unused)
        lengths: tuple[int, ...] = (_number(spec.name, args[where[1]]),)
    else:
        lengths = _iovec(spec.name, [args[i] for i in where[1:]])
    cmd = Command("write", offset, sum(lengths), None if z else pattern, z, "u" in flags, False, "q" in flags,
                  text.rstrip("\n"), lineno, spec.name, lengths, "f" in flags)
    return cmd, 1 if where == [len(args) - 2, len(args) - 1] else 0


def _read(spec: Spec, typed: str, args: list[str], text: str, lineno: int) -> Parsed:
    opts, where, error = _options(spec, typed, args)
    flags = ""
    pattern: int | None = None
    pattern_offset, pattern_count = 0, 0
    for ch, arg in opts:
        if ch == "l":
            pattern_count = _number("read", arg)
        elif ch == "P":
            pattern = parse_pattern(arg)
        elif ch == "s":
            pattern_offset = _number("read", arg)
        flags += ch
    if error:
        raise _bad_option(spec, error)
    if len(where) != 2:
        raise _usage(spec)
    offset = _number("read", args[where[0]])
    count = _number("read", args[where[1]])
    if count > MAX_BYTES:
        raise SyntaxProblem(f"read: length cannot exceed {MAX_BYTES}, given {args[where[1]]}")
    if "P" not in flags and ("l" in flags or "s" in flags):
        raise _usage(spec)
    if "l" not in flags:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        raise SyntaxProblem("read: pattern verification range exceeds end of read data")
    if "b" in flags:
        _aligned("read", offset, count)
        raise Unsupported(f"read -b (read from the VM state) is not supported: {VMSTATE_REFUSAL}")
    ranged = "l" in flags or "s" in flags
    cmd = Command("read", offset, count, pattern, False, False, False, "q" in flags, text.rstrip("\n"), lineno,
                  "", (), False, False, pattern_offset, pattern_count if ranged else -1)
    return cmd, 0 if ranged or where != [len(args) - 2, len(args) - 1] else 1


def _vector_read(spec: Spec, typed: str, args: list[str], text: str, lineno: int) -> Parsed:
    """readv and aio_read: one read request of the buffers' total length, checked as a whole."""
    flags, pattern, where = _vector_options(spec, typed, args)
    if flags == "i":
        return None, 0
    offset = _number(spec.name, args[where[0]])
    lengths = _iovec(spec.name, [args[i] for i in where[1:]])
    cmd = Command("read", offset, sum(lengths), pattern, False, False, False, "q" in flags, text.rstrip("\n"),
                  lineno, spec.name, lengths)
    return cmd, 1 if where == [len(args) - 2, len(args) - 1] else 0


def _discard(spec: Spec, typed: str, args: list[str], text: str, lineno: int) -> Parsed:
    opts, where, error = _options(spec, typed, args)
    if error:
        raise _bad_option(spec, error)
    if len(where) != 2:
        raise _usage(spec)
    offset = _number("discard", args[where[0]])
    count = _number("discard", args[where[1]])
    if count > MAX_BYTES:
        raise SyntaxProblem(f"discard: length cannot exceed {MAX_BYTES}, given {args[where[1]]}")
    quiet = any(ch == "q" for ch, _ in opts)
    cmd = Command("discard", offset, count, None, False, False, False, quiet, text.rstrip("\n"), lineno)
    return cmd, 1 if where == [len(args) - 2, len(args) - 1] else 0


def _ignored(spec: Spec, args: list[str]) -> None:
    """Commands that only print: their arguments are checked as qemu-io checks them."""
    if spec.name == "alloc":
        for w in args:
            _number("alloc", w)
    elif spec.name == "sleep":
        ms = strtol(args[0])
        if ms is None or ms < 0:
            raise SyntaxProblem(f"sleep: {args[0]} is not a valid number")
    elif spec.name == "help" and args and args[0] not in BY_NAME:
        raise SyntaxProblem(f"help: command {args[0]} not found")


def sleep_ms(text: str, strict: bool = False) -> int:
    """How long a line that parse_line found valid makes qemu-io wait: the milliseconds of a
    `sleep` (qemu-io holds the image, locks and all, meanwhile), 0 for any other line."""
    words = _words(_c_string(text), strict)
    if len(words) != 2 or words[0] != "sleep":
        return 0
    return max(strtol(words[1]) or 0, 0)


def _parse(text: str, lineno: int, strict: bool) -> Parsed:
    words = _words(text, strict)
    if not words:
        return None, 0
    spec = BY_NAME.get(words[0])
    if spec is None:
        raise SyntaxProblem(f'command "{words[0]}" not found')
    args = words[1:]
    problem = spec.count_problem(words[0], len(args))
    if problem:
        raise SyntaxProblem(problem)
    if spec.kind == REFUSE:
        raise Unsupported(f"{spec.name} is not supported: {spec.why}")
    if spec.kind == IGNORE:
        _ignored(spec, args)
        return None, 0
    name = spec.name
    if name == "write":
        return _write(spec, words[0], args, text, lineno)
    if name == "writev" or name == "aio_write":
        return _vector_write(spec, words[0], args, text, lineno)
    if name == "read":
        return _read(spec, words[0], args, text, lineno)
    if name == "readv" or name == "aio_read":
        return _vector_read(spec, words[0], args, text, lineno)
    if name == "discard":
        return _discard(spec, words[0], args, text, lineno)
    return Command(name, text=text.rstrip("\n"), lineno=lineno), 0  # flush, quit


def _parse_line(text: str, lineno: int) -> Command | None:
    """The full parser (what parse_line falls back to)."""
    return _parse_checked(text, lineno, False)[0]


def _parse_checked(text: str, lineno: int, strict: bool) -> Parsed:
    try:
        return _parse(text, lineno, strict)
    except SyntaxProblem as e:
        if "\r" in text:
            raise type(e)(f"{e} (the line has a carriage return: DOS line endings, which qemu-io "
                          f"rejects as well)") from None
        if strict and "#" in text:
            raise type(e)(f"{e} (qemu-io has no comments: '#' is a word to it)") from None
        if strict and text[:1] == "\ufeff":
            raise type(e)(f"{e} (a UTF-8 byte order mark, which qemu-io reads as part of the command)") from None
        raise


# The part of a line before its two numbers -> the command it makes (options checked once) and
# what both numbers must be a multiple of: a trace repeats a few spellings ("write -q -P 0xd1",
# "discard -q") a hundred thousand times.
_HEADS: dict[str, tuple[Command, int]] = {}


def _fits(known: Command, length: int) -> bool:
    """The numbers of a remembered head pass every check the full parser makes of them."""
    if known.zero and (known.no_fallback or known.asynchronous):
        return True  # no length limit
    return length <= MAX_BYTES


def parse_line(text: str, lineno: int = 0, strict: bool = False) -> Command | None:
    """One trace line -> Command; None for blank, comment and print-only lines (`#` to end of line).
    A UTF-8 byte order mark starting the first line (editors on Windows write one) is not part of it.
    `strict`: exactly qemu-io's reading, neither comments nor a byte order mark (qemu-io: `command
    "#" not found`). (The remembered heads below come from lines without either, so both modes
    share them.)"""
    if not strict and lineno <= 1 and text[:1] == "\ufeff":
        text = text[1:]
    body = text[:-1] if text.endswith("\n") else text
    parts = body.rsplit(" ", 2)
    if len(parts) == 3:
        head, off, length = parts
        known = _HEADS.get(head)
        if known is not None and is_plain_decimal(off) and is_plain_decimal(length):
            head_cmd, head_align = known
            o, n = int(off), int(length)
            if o % head_align == 0 and n % head_align == 0 and _fits(head_cmd, n):
                return Command(head_cmd.op, o, n, head_cmd.pattern, head_cmd.zero, head_cmd.unmap, head_cmd.compressed,
                               head_cmd.quiet, body, lineno, head_cmd.verb, (n,) if head_cmd.lengths else (),
                               head_cmd.fua, head_cmd.no_fallback)
    cmd, align = _parse_checked(text, lineno, strict)
    if cmd is not None and align and len(parts) == 3 and "#" not in text:
        # the numbers were the command's two arguments: any others that pass its checks make the same command
        if len(_HEADS) > 1024:
            _HEADS.clear()
        _HEADS[parts[0]] = (cmd, align)
    return cmd


FGETS_MAX: Final = 1023  # qemu-io reads standard input with fgets() into a 1024-byte buffer


def numbered(lines: Iterable[str], fgets: bool = False) -> Iterator[tuple[int, str, str]]:
    """(line number, command text, what a message about it adds) as qemu-io reads a trace on
    standard input. qemu-io's commands are C strings: a NUL byte ends one (the rest of its line is
    never seen). `fgets`: a line longer than 1023 bytes is several commands, of 1023 bytes each and
    the rest, as qemu-io's fgets() reads it (all carrying the line's number, each message saying
    which bytes); otherwise it is one command, as with `qemu-io -c`."""
    for n, line in enumerate(lines, 1):
        if fgets and len(line) > FGETS_MAX // 4:  # (at most 4 bytes a character)
            raw = line.encode("utf-8", "surrogateescape")
            if len(raw) > FGETS_MAX:
                for at in range(0, len(raw), FGETS_MAX):
                    piece = raw[at:at + FGETS_MAX]
                    yield n, _c_string(piece.decode("utf-8", "surrogateescape")), (
                        f" (bytes {at + 1}-{at + len(piece)} of a {len(raw)}-byte line: qemu-io reads a trace "
                        f"{FGETS_MAX} bytes at a time)")
                continue
        yield n, _c_string(line), ""


def _c_string(text: str) -> str:
    return text.split("\0", 1)[0] if "\0" in text else text


def parse_trace(lines: Iterable[str], source: str, strict: bool = False) -> list[Command]:
    """All commands of a trace up to a `quit` (qemu-io reads no further); a bad line raises
    SyntaxProblem('SOURCE:LINE: reason') (Unsupported for a line qemu-io runs and qdebug cannot).
    `strict`: the trace exactly as `qemu-io IMAGE < TRACE` reads it (no comments, no byte order
    mark, long lines cut as qemu-io cuts them)."""
    out: list[Command] = []
    for n, line, cut in numbered(lines, strict):
        try:
            cmd = parse_line(line, n, strict)
        except SyntaxProblem as e:
            raise type(e)(f"{source}:{n}: {e}{cut}") from None
        if cmd is not None:
            if cmd.op == "quit":
                break
            out.append(cmd)
    return out


def check_trace(lines: Iterable[str], source: str, strict: bool = False, fgets: bool | None = None,
                keep: list[Command] | None = None, keep_max: int = 0) -> tuple[int, list[tuple[int, SyntaxProblem]]]:
    """Every line up to a `quit` through the parser, before anything runs: (commands, problems)
    where each problem is (line number, SyntaxProblem naming SOURCE:LINE) in line order. `fgets`
    (default: `strict`) reads long lines as qemu-io reads standard input (`numbered`). With
    `keep`, the commands are appended to it while there are at most `keep_max` (a caller that
    runs them then parses nothing twice); past that it is emptied and keeps nothing."""
    problems: list[tuple[int, SyntaxProblem]] = []
    count = 0
    keeping = keep is not None
    for n, line, cut in numbered(lines, strict if fgets is None else fgets):
        try:
            cmd = parse_line(line, n, strict)
        except SyntaxProblem as e:
            problems.append((n, type(e)(f"{source}:{n}: {e}{cut}")))
            continue
        if cmd is not None:
            if cmd.op == "quit":
                break
            count += 1
            if keeping:
                if count > keep_max:
                    keep.clear()  # type: ignore[union-attr]
                    keeping = False
                else:
                    keep.append(cmd)  # type: ignore[union-attr]
    return count, problems
