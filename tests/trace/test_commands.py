"""qemu-io command parsing: spellings qemu-io accepts parse; what it rejects is a SyntaxProblem."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdebug.engine.write.ops import Command
from qdebug.trace.commands import parse_line, parse_trace
from qdebug.trace.syntax import SyntaxProblem
from tests.qemu import create, qemu_io


@pytest.mark.parametrize("text,expect", [
    ("write -P 0x22 8k 4k", Command("write", 8192, 4096, pattern=0x22)),
    ("write -q -P0x22 0x2000 4K", Command("write", 8192, 4096, pattern=0x22, quiet=True)),
    ("write -z -u 1M 64k", Command("write", 1 << 20, 65536, zero=True, unmap=True)),
    ("write -zu 1M 64k", Command("write", 1 << 20, 65536, zero=True, unmap=True)),
    ("write -c -P 17 0 64k", Command("write", 0, 65536, pattern=17, compressed=True)),
    ("write -P 010 0 512", Command("write", 0, 512, pattern=8)),
    ("discard -q 0 2G", Command("discard", 0, 2 << 30, quiet=True)),
    ("read -P 0xcd 512 512  # check", Command("read", 512, 512, pattern=0xCD)),
    ("flush", Command("flush")),
    ("w 0 1k", Command("write", 0, 1024)),
])
def test_parse_line(text, expect):
    got = parse_line(text, 7)
    assert got is not None
    assert (got.op, got.offset, got.length, got.pattern, got.zero, got.unmap, got.compressed, got.quiet) == (
        expect.op, expect.offset, expect.length, expect.pattern, expect.zero, expect.unmap,
        expect.compressed, expect.quiet)
    assert got.lineno == 7 and got.text == text


@pytest.mark.parametrize("text", ["", "   ", "# comment", "  # write 0 1k"])
def test_blank_and_comment_lines(text):
    assert parse_line(text) is None


@pytest.mark.parametrize("text,msg", [
    ("writ 0 1k", "unknown command"),
    ("write 0", "needs OFFSET and LENGTH"),
    ("write -u 0 1k", "-u requires -z"),
    ("write -z -P 1 0 1k", "cannot be used together"),
    ("write -P 256 0 1k", "not a valid pattern"),
    ("write -P zz 0 1k", "not a valid pattern"),
    ("write -P", "needs a pattern"),
    ("write -x 0 1k", "unsupported option -x"),
    ("write 0 1q", "invalid number"),
    ("discard -z 0 1k", "unsupported option -z"),
    ("flush 0", "no arguments"),
])
def test_errors_name_the_problem(text, msg):
    with pytest.raises(SyntaxProblem, match=msg):
        parse_line(text)


def test_parse_trace_reports_source_and_line():
    cmds = parse_trace(["# header", "write 0 1k", "", "discard 0 64k"], "t.trace")
    assert [(c.op, c.lineno) for c in cmds] == [("write", 2), ("discard", 4)]
    with pytest.raises(SyntaxProblem, match=r"^t\.trace:3: unknown command 'bogus'"):
        parse_trace(["write 0 1k", "flush", "bogus 1 2"], "t.trace")


@given(st.sampled_from(["write", "read", "discard"]), st.integers(0, 1 << 40), st.integers(0, 1 << 30),
       st.one_of(st.none(), st.integers(0, 255)), st.booleans())
def test_to_qemu_io_round_trips(op, off, length, pattern, quiet):
    if op == "discard":
        pattern = None
    c = Command(op, off, length, pattern=pattern, quiet=quiet)
    back = parse_line(c.to_qemu_io())
    assert (back.op, back.offset, back.length, back.pattern, back.quiet) == (op, off, length, pattern, quiet)


def test_qemu_io_accepts_the_same_lines(qemu, tmp_path):
    """Every line parse_line accepts, qemu-io runs without a usage error (same syntax)."""
    img = create(str(tmp_path / "a.qcow2"), "4M")
    lines = ["write -P 0x22 8k 4k", "write -q -P0x22 0x2000 4K", "write -z -u 1M 64k", "write -zu 1M 64k",
             "write -c -P 17 2M 64k", "write -P 010 0 512", "discard -q 0 64k", "read -P 17 2M 512",
             "flush", "w 3M 1k", "write -P 0xcd 64k 512", "read -P 0xcd 64k 512"]
    for line in lines:
        assert parse_line(line) is not None
    p = qemu_io(img, *lines)
    out = p.stdout.decode() + p.stderr.decode()
    assert "invalid" not in out.lower() and "usage" not in out.lower(), out


_HEAD_WORDS = st.sampled_from(["write", "read", "discard", "flush", "w", "r", "-q", "-z", "-u", "-c", "-zu", "-qz",
                               "-P", "0x22", "0x1ff", "7", "-P0x5", "-x", "#", "4k", "1M"])


@given(heads=st.lists(st.lists(_HEAD_WORDS, min_size=1, max_size=5).map(" ".join), min_size=1, max_size=4),
       numbers=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 20)), min_size=1, max_size=6),
       spacing=st.sampled_from([" ", "  ", "\t"]), newline=st.booleans())
def test_remembered_heads_parse_as_the_full_parser(heads, numbers, spacing, newline):
    """parse_line remembers the options part of lines it parsed; a later line with the same part
    and other numbers must make exactly what the full parser makes of it (or fail the same way)."""
    from qdebug.trace import commands

    def full(text):
        try:
            return commands._parse_line(text, 3)
        except SyntaxProblem as e:
            return str(e)

    def fast(text):
        try:
            return parse_line(text, 3)
        except SyntaxProblem as e:
            return str(e)

    for head in heads:
        for off, length in numbers:
            text = f"{head}{spacing}{off}{spacing}{length}" + ("\n" if newline else "")
            assert fast(text) == full(text), text


def test_remembered_head_is_not_reused_for_other_shapes():
    assert parse_line("write -P 0x22 0 512", 1) == Command("write", 0, 512, 0x22, text="write -P 0x22 0 512", lineno=1)
    # the same head, but "-P" now eats a number in the full parser's reading
    with pytest.raises(SyntaxProblem):
        parse_line("write -P 0x22 0 4k 512", 2)
    assert parse_line("write -P 0x22 4k 512", 3).offset == 4096
