"""qemu-io command parsing: what each spelling means, qemu-io's messages for what it rejects, and
the fast path (remembered option heads) against the full parser. The differential corpus against
qemu-io 7.2 itself is tests/trace/test_qemu_io_syntax.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdebug.engine.write.ops import Command
from qdebug.trace.commands import check_trace, parse_line, parse_trace
from qdebug.trace.syntax import SyntaxProblem, Unsupported, getopt, parse_size, strtosz


def fields(c: Command | None):
    if c is None:
        return None
    return (c.op, c.offset, c.length, c.pattern, c.zero, c.unmap, c.compressed, c.quiet, c.verb, c.lengths, c.fua,
            c.no_fallback, c.pattern_offset, c.pattern_count, c.source)


@pytest.mark.parametrize("text,expect", [
    ("write -P 0x22 8k 4k", Command("write", 8192, 4096, pattern=0x22)),
    ("write -q -P0x22 0x2000 4K", Command("write", 8192, 4096, pattern=0x22, quiet=True)),
    ("write -z -u 1M 64k", Command("write", 1 << 20, 65536, zero=True, unmap=True)),
    ("write -zu 1M 64k", Command("write", 1 << 20, 65536, zero=True, unmap=True)),
    ("write -c -P 17 0 64k", Command("write", 0, 65536, pattern=17, compressed=True)),
    ("write -P 010 0 512", Command("write", 0, 512, pattern=8)),
    ("write 0 1k -P 5", Command("write", 0, 1024, pattern=5)),  # getopt permutes
    ("write -P 5 5 512", Command("write", 5, 512, pattern=5)),
    ("write -- 0 512", Command("write", 0, 512)),
    ("write -P 1 -P 2 0 512", Command("write", 0, 512, pattern=2)),
    ("write -p -C 0 512", Command("write", 0, 512)),
    ("write -f 0 512", Command("write", 0, 512, fua=True)),
    ("write -zn 0 2k", Command("write", 0, 2048, zero=True, no_fallback=True)),
    ("write -zn 0 3g", Command("write", 0, 3 << 30, zero=True, no_fallback=True)),  # no limit with -n
    ("write -c -z 0 64k", Command("write", 0, 65536, zero=True)),  # -z wins; -c only checks alignment
    ("write 1.5k 0x200", Command("write", 1536, 512)),
    ("write +5 \t512", Command("write", 5, 512)),
    ("writev -P 1 0 512 1k", Command("write", 0, 1536, pattern=1, verb="writev", lengths=(512, 1024))),
    ("writev -f 0 0", Command("write", 0, 0, verb="writev", lengths=(0,), fua=True)),
    ("aio_write -z -u 0 3g", Command("write", 0, 3 << 30, zero=True, unmap=True, verb="aio_write",
                                     lengths=(3 << 30,))),
    ("aio_write -z -P 5 0 512", Command("write", 0, 512, zero=True, verb="aio_write", lengths=(512,))),
    ("aio_write 0 1000", Command("write", 0, 1000, verb="aio_write", lengths=(1000,))),
    ("discard -q 0 1G", Command("discard", 0, 1 << 30, quiet=True)),
    ("d 0 64k", Command("discard", 0, 65536)),
    ("read -P 0xcd 512 512  # check", Command("read", 512, 512, pattern=0xCD)),
    ("read -v -C -p 0 16", Command("read", 0, 16)),
    ("read -P 0 -s 100 -l 412 0 512", Command("read", 0, 512, pattern=0, pattern_offset=100, pattern_count=412)),
    ("read -P 0 -s 0x10 0 2k", Command("read", 0, 2048, pattern=0, pattern_offset=16, pattern_count=2032)),
    ("readv -P 5 0 512 512", Command("read", 0, 1024, pattern=5, verb="readv", lengths=(512, 512))),
    ("aio_read -v 0 512", Command("read", 0, 512, verb="aio_read", lengths=(512,))),
    ("flush", Command("flush")),
    ("f", Command("flush")),
    ("quit now", Command("quit")),
    ("w 0 1k", Command("write", 0, 1024)),
    ("r 0 1k", Command("read", 0, 1024)),
])
def test_parse_line(text, expect):
    got = parse_line(text, 7)
    assert fields(got) == fields(expect)
    assert got.lineno == 7 and got.text == text


@pytest.mark.parametrize("text", ["", "   ", "# comment", "  # write 0 1k", "aio_flush", "help", "help write",
                                  "? r", "map", "info", "i", "length", "alloc 0", "a 1 5", "sleep 0x5",
                                  "aio_write -i -x", "aio_read -i 0", "aio_write -P 5 -i"])
def test_lines_that_change_and_check_nothing(text):
    assert parse_line(text) is None


@pytest.mark.parametrize("text,msg", [
    ("writ 0 1k", 'command "writ" not found'),
    ("write\t0 1k", 'command "write\t0" not found'),  # qemu-io splits on spaces only
    ("write 0", "bad argument count 1 to write, expected at least 2 arguments"),
    ("flush 0", "bad argument count 1 to flush, expected 0 arguments"),
    ("a 0 1 2", "bad argument count 3 to a, expected between 1 and 2 arguments"),
    ("write 0 1k 2k", "usage: write [-bcCfnquz] [-P pattern | -s source_file] off len"),
    ("write -u 0 1k", "-u requires -z to be specified"),
    ("write -n 0 1k", "-n requires -z to be specified"),
    ("write -z -P 1 0 1k", "Only one of -z, -P, and -s can be specified at the same time"),
    ("write -f -c 0 64k", "-f and -b or -c cannot be specified at the same time"),
    ("write -P 256 0 1k", "256 is not a valid pattern byte"),
    ("write -P 08 0 1k", "08 is not a valid pattern byte"),
    ("write -Pq 0 1k", "q is not a valid pattern byte"),
    ("write 0 1k -P", "write: option requires an argument -- 'P'"),
    ("write -x 0 1k", "write: invalid option -- 'x'"),
    ("write --P 0 1k", "write: invalid option -- '-'"),
    ("write -1 1k", "write: invalid option -- '1'"),
    ("write 0 1q", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1q"),
    ("write 0 9e", "Parsing error: argument too large -- 9e"),
    ("write 0 2147483137", "length cannot exceed 2147483136 without -n, given 2147483137"),
    ("write -c 1 512", "1 is not a sector-aligned value for 'offset'"),
    ("write -c 0 100", "100 is not a sector-aligned value for 'count'"),
    ("write 0 512\r", "DOS line endings"),
    ("discard -z 0 1k", "discard: invalid option -- 'z'"),
    ("discard 0 2G", "length cannot exceed 2147483136, given 2G"),
    ("writev 0 2g 2g", "Argument '2g' exceeds maximum size 2147483136"),
    ("writev 0 2147483136 512", "The total number of bytes exceed the maximum size"),
    ("aio_write -z 0 512 512", "-z supports only a single length parameter"),
    ("read -s 10 0 512", "usage: read"),
    ("read -P 0 -s 600 0 512", "pattern verification range exceeds end of read data"),
    ("read 0 2147483137", "length cannot exceed 2147483136, given 2147483137"),
    ("sleep -1", "-1 is not a valid number"),
    ("help foo", "command foo not found"),
    ("alloc x", "Parsing error"),
    ("write -s /nonexistent/file 0 1k", "/nonexistent/file: No such file or directory"),
    ("write -s /dev/null 0 1k", "/dev/null: file is empty"),
])
def test_errors_are_qemu_ios(text, msg):
    with pytest.raises(SyntaxProblem, match=msg.replace("[", r"\[").replace("]", r"\]")) as e:
        parse_line(text)
    assert not isinstance(e.value, Unsupported)


@pytest.mark.parametrize("text,name", [
    ("truncate 1M", "truncate"), ("t -m full 8M", "truncate"), ("open x", "open"), ("close", "close"),
    ("reopen -o lazy-refcounts=on", "reopen"), ("break a b", "break"), ("resume a", "resume"),
    ("wait_break a", "wait_break"), ("remove_break a", "remove_break"), ("abort", "abort"),
    ("sigraise 15", "sigraise"), ("write -b 0 512", "write -b"), ("read -b 0 512", "read -b"),
])
def test_what_qdebug_does_not_reproduce_is_refused_by_name(text, name):
    with pytest.raises(Unsupported, match=rf"^{name} .*is not supported"):
        parse_line(text)


def test_write_s_reads_the_file_and_repeats_it(tmp_path):
    src = tmp_path / "data"
    src.write_bytes(b"abc")
    cmd = parse_line(f"write -s {src} 1k 10")
    assert cmd.source == b"abc" and cmd.payload(1024, 10) == b"abcabcabca" and cmd.payload(1025, 4) == b"bcab"
    src.write_bytes(b"0123456789" * 100)
    assert parse_line(f"write -s {src} 0 16").source == b"0123456789012345"
    with pytest.raises(SyntaxProblem, match="file is empty"):  # qemu-io reads 0 bytes and gives up
        parse_line(f"write -s {src} 0 0")


def test_parse_trace_reports_source_and_line_and_stops_at_quit():
    cmds = parse_trace(["# header", "write 0 1k", "", "discard 0 64k", "map", "quit", "bogus"], "t.trace")
    assert [(c.op, c.lineno) for c in cmds] == [("write", 2), ("discard", 4)]
    with pytest.raises(SyntaxProblem, match=r'^t\.trace:3: command "bogus" not found'):
        parse_trace(["write 0 1k", "flush", "bogus 1 2"], "t.trace")
    with pytest.raises(Unsupported, match=r"^t\.trace:2: truncate"):
        parse_trace(["write 0 1k", "truncate 1M"], "t.trace")


def test_check_trace_lists_every_bad_line():
    count, problems = check_trace(["write 0 1k", "bogus", "truncate 1M", "read 0 1k", "q", "bogus"], "t")
    assert count == 2
    assert [(n, type(e).__name__) for n, e in problems] == [(2, "SyntaxProblem"), (3, "Unsupported")]
    assert str(problems[0][1]).startswith("t:2: ")


@given(st.sampled_from(["write", "read", "discard", "writev", "readv", "aio_write", "aio_read"]),
       st.integers(0, 1 << 40), st.lists(st.integers(0, 1 << 20), min_size=1, max_size=3),
       st.one_of(st.none(), st.integers(0, 255)), st.booleans(), st.booleans())
def test_to_qemu_io_round_trips(verb, off, lengths, pattern, quiet, fua):
    op = {"writev": "write", "aio_write": "write", "readv": "read", "aio_read": "read"}.get(verb, verb)
    if verb in ("write", "read", "discard"):
        lengths = lengths[:1]
    if op == "discard":
        pattern = None
    if op != "write":
        fua = False
    c = Command(op, off, sum(lengths), pattern=pattern, quiet=quiet, fua=fua, verb="" if verb == op else verb,
                lengths=() if verb == op else tuple(lengths))
    assert fields(parse_line(c.to_qemu_io())) == fields(c)


@pytest.mark.parametrize("text,value", [
    ("1.5k", 1536), ("1.", 1), ("1.k", 1024), ("0x1k", 1024), ("010", 10), ("1e", 1 << 60), ("+5", 5),
    ("1.0", 1), ("0.0005k", 1), ("0.9999k", 1024), ("0.49951171875k", 512), ("1b", 1), ("1.b", 1), ("512B", 512),
    ("9223372036854775807", (1 << 63) - 1), ("7.9999999999999999E", 9223372036854775680), ("\t512", 512),
    ("0.99999999999999999999k", 0),  # the fraction rounds to 1.0, which QEMU's (uint64_t) cast makes 0
    ("1." + "0" * 306 + "1k", 1024), ("1." + "0" * 307 + "1k", 1),  # strtod underflow: QEMU skips the 'k'
])
def test_numbers_as_qemu_io_reads_them(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,code", [
    ("1e3", -22), (".5k", -22), ("0x", -22), ("9e", -34), ("9ex", -22), ("0x1.5k", -22), ("00x10", -22),
    ("1-2", -22), ("1.5", -22), ("1e-3k", -22), ("0.5b", -22), ("9223372036854775808", -34), ("8E", -34),
    ("0xffffffffffffffff", -34), ("512\t", -22), ("-5", -22), ("99999999999999999999x", -22),
    ("-99999999999999999999999", -34), ("", -22),
])
def test_numbers_qemu_io_rejects(text, code):
    assert strtosz(text) == code


def test_getopt_permutes_and_stops_at_the_first_bad_option():
    assert getopt("write", ["0", "-P", "5", "1k", "-q"], "P:q") == ([("P", "5"), ("q", "")], [0, 3], "")
    assert getopt("write", ["-qP5", "--", "-1", "2"], "P:q") == ([("q", ""), ("P", "5")], [2, 3], "")
    assert getopt("w", ["-q", "-x", "-P"], "P:q") == ([("q", "")], [], "w: invalid option -- 'x'")
    assert getopt("w", ["0", "-P"], "P:q") == ([], [0], "w: option requires an argument -- 'P'")
    assert getopt("w", ["-", "-P", "--"], "P:q") == ([("P", "--")], [0], "")


_HEAD_WORDS = st.sampled_from(["write", "read", "discard", "flush", "w", "r", "writev", "readv", "aio_write",
                               "aio_read", "-q", "-z", "-u", "-c", "-zu", "-qz", "-f", "-n", "-zn", "-i", "-v",
                               "--", "-s", "-l", "-P", "0x22", "0x1ff", "7", "512", "-P0x5", "-x", "#", "4k", "1M",
                               "0x200", "1.5k", "\t", "-b"])


@given(heads=st.lists(st.lists(_HEAD_WORDS, min_size=1, max_size=5).map(" ".join), min_size=1, max_size=4),
       numbers=st.lists(st.tuples(st.integers(0, 1 << 40), st.sampled_from([0, 1, 100, 512, 4096, 1 << 16, 1 << 20,
                                                                             MAX := 2147483136, MAX + 1, 3 << 30])),
                        min_size=1, max_size=6),
       spacing=st.sampled_from([" ", "  ", "\t"]), newline=st.booleans())
def test_remembered_heads_parse_as_the_full_parser(heads, numbers, spacing, newline):
    """parse_line remembers the options part of lines it parsed; a later line with the same part
    and other numbers must make exactly what the full parser makes of it (or fail the same way):
    the numbers' own checks (length limits, sector alignment for -c) included."""
    from qdebug.trace import commands

    def full(text):
        try:
            return fields(commands._parse_line(text, 3))
        except SyntaxProblem as e:
            return str(e)

    def fast(text):
        try:
            return fields(parse_line(text, 3))
        except SyntaxProblem as e:
            return str(e)

    for head in heads:
        for off, length in numbers:
            text = f"{head}{spacing}{off}{spacing}{length}" + ("\n" if newline else "")
            assert fast(text) == full(text), text


def test_remembered_head_is_not_reused_for_other_shapes():
    assert fields(parse_line("write -P 0x22 0 512", 1)) == fields(Command("write", 0, 512, 0x22))
    # the same head, but "-P" now eats a number in the full parser's reading
    with pytest.raises(SyntaxProblem):
        parse_line("write -P 0x22 0 4k 512", 2)
    assert parse_line("write -P 0x22 4k 512", 3).offset == 4096
    # a remembered compressed head still checks each line's alignment and length
    assert parse_line("write -c 0 65536", 4).compressed
    with pytest.raises(SyntaxProblem, match="sector-aligned"):
        parse_line("write -c 0 100", 5)
    assert fields(parse_line("writev 0 512", 6)) == fields(Command("write", 0, 512, verb="writev", lengths=(512,)))
    assert parse_line("writev 0 4096", 7).lengths == (4096,)
    with pytest.raises(SyntaxProblem, match="exceeds maximum size"):
        parse_line("writev 0 2147483137", 8)
