"""The iolog and trace-event readers and the pattern/read-check logic of `qdebug trace import`,
on hand-written inputs (the real fio / qemu-io ones are in test_import_roundtrip.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdebug.cli import main
from qdebug.trace.commands import parse_trace
from qdebug.trace.importers import GuestContent, GuestIO, ImportProblem, import_trace, pattern_byte, to_commands

V3 = """fio version 3 iolog
17 /dev/x add
20 /dev/x open
25 /dev/x write 4096 8192
26 /dev/x read 4096 4096
27 /dev/x read 0 8192
30 /dev/x trim 0 65536
31 /dev/x read 4096 4096
33 /dev/x sync 0 0
34 /dev/x datasync 0 0
40 /dev/x write 12288 0
41 /dev/x close
"""


def _write(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_fio_v3_actions_become_qemu_io_commands(tmp_path):
    t = import_trace(_write(tmp_path, "a.log", V3), "fio", pattern_seed=7)
    p = pattern_byte(7, 0)
    assert [c.to_qemu_io() for c in t.commands] == [
        f"write -P 0x{p:x} 4096 8192",
        f"read -P 0x{p:x} 4096 4096",  # decided by the write before it
        "read 0 8192",  # [0, 4k) was never written: no check
        "discard 0 65536",
        "read 4096 4096",  # discarded: QEMU may keep or zero it
        "flush", "flush",
    ]
    assert t.selected == "/dev/x" and t.size_needed == 65536
    assert t.skipped == {"zero-length requests": 1}


def test_fio_v2_is_the_same_log_without_timestamps(tmp_path):
    v2 = "fio version 2 iolog\n" + "".join(line.split(None, 1)[1] + "\n" for line in V3.splitlines()[1:])
    v2 += "/dev/x wait 100 0\n"
    a = import_trace(_write(tmp_path, "a.log", V3), "fio")
    b = import_trace(_write(tmp_path, "b.log", v2), "fio")
    assert a.to_text() == b.to_text()
    assert b.skipped == {"zero-length requests": 1, "waits": 1}


@pytest.mark.parametrize("text, message", [
    ("0,4096,512\n", "not a fio iolog"),
    ("fio version 3 iolog\n1 /dev/x write 0\n", ":2: expected TIMESTAMP FILE ACTION OFFSET LENGTH"),
    ("fio version 3 iolog\nabc /dev/x write 0 1\n", ":2: timestamp 'abc' is not a number"),
    ("fio version 2 iolog\n/dev/x write -5 1\n", ":2: offset '-5' is not a number"),
    ("fio version 2 iolog\n/dev/x frobnicate 0 1\n", ":2: unknown fio action 'frobnicate'"),
    ("fio version 3 iolog\n1 /dev/x wait 100 0\n", "not allowed in a version 3 iolog"),
    ("fio version 3 iolog\n1 /dev/x add\n", "has no read, write or trim"),
    ("fio version 2 iolog\n/a write 0 1\n/b write 0 1\n", "I/O on 2 files (/a, /b): choose one with --file"),
])
def test_fio_bad_input_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(ImportProblem, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_trace(_write(tmp_path, "bad.log", text), "fio")


def test_fio_file_selection_by_path_or_basename(tmp_path):
    path = _write(tmp_path, "m.log", "fio version 2 iolog\n/d/a write 0 512\n/d/b write 512 512\n")
    assert import_trace(path, "fio", select="/d/b").commands[0].offset == 512
    assert import_trace(path, "fio", select="a").commands[0].offset == 0
    with pytest.raises(ImportProblem, match="no file 'c'"):
        import_trace(path, "fio", select="c")


EVENTS = """\
bdrv_open_common bs 0x10 filename "disk.qcow2" flags 0xe002 format_name "file"
blk_root_attach child 0x1 blk 0xa0 bs 0x10
blk_co_preadv blk 0xa0 bs 0x10 offset 0 bytes 512 flags 0x0
blk_root_detach child 0x1 blk 0xa0 bs 0x10
bdrv_open_common bs 0x20 filename "disk.qcow2" flags 0x6002 format_name "qcow2"
blk_root_attach child 0x2 blk 0xb0 bs 0x20
12@1700000000.000001:blk_co_pwritev blk 0xb0 bs 0x20 offset 0 bytes 65536 flags 0x0
12@1700000000.000002:bdrv_co_pwritev_part bs 0x20 offset 0 bytes 65536 flags 0x10
bdrv_co_pwritev_part bs 0x10 offset 327680 bytes 65536 flags 0x0
wrote 65536/65536 bytes at offset 0
blk_co_pwritev blk 0xb0 bs 0x20 offset 65536 bytes 8192 flags 0x2
bdrv_co_pwritev_part bs 0x20 offset 65536 bytes 8192 flags 0x12
blk_co_pwritev blk 0xb0 bs 0x20 offset 131072 bytes 65536 flags 0x6
bdrv_co_pwritev_part bs 0x20 offset 131072 bytes 65536 flags 0x16
blk_co_pwritev blk 0xb0 bs 0x20 offset 262144 bytes 65536 flags 0x30
bdrv_co_pwritev_part bs 0x20 offset 262144 bytes 65536 flags 0x30
bdrv_co_pwritev_part bs 0x10 offset 393216 bytes 79 flags 0x0
"""


def _ops(trace) -> list[tuple]:
    return [(c.op, c.offset, c.length, c.zero, c.unmap, c.compressed) for c in trace.commands]


WANT = [("write", 0, 65536, False, False, False), ("write", 65536, 8192, True, False, False),
        ("write", 131072, 65536, True, True, False), ("write", 262144, 65536, False, False, True)]


def test_qemu_events_at_the_blockbackend(tmp_path):
    t = import_trace(_write(tmp_path, "t.log", EVENTS), "qemu-trace")
    assert _ops(t) == WANT
    assert "BlockBackend 0xb0" in t.selected and "disk.qcow2 (qcow2)" in t.selected


def test_qemu_events_at_the_node_a_blockbackend_roots(tmp_path):
    """Without blk_co_pwritev: the node attached as a BlockBackend root, not the file node under it."""
    text = "".join(line + "\n" for line in EVENTS.splitlines() if "blk_co_pwritev" not in line)
    assert _ops(import_trace(_write(tmp_path, "t.log", text), "qemu-trace")) == WANT
    bare = "".join(line + "\n" for line in text.splitlines() if "blk_root" not in line)
    path = _write(tmp_path, "bare.log", bare)
    with pytest.raises(ImportProblem, match="cannot tell the guest-facing node"):
        import_trace(path, "qemu-trace")
    assert _ops(import_trace(path, "qemu-trace", select="disk.qcow2")) == WANT  # the format node, not "file"
    assert _ops(import_trace(path, "qemu-trace", select="0x20")) == WANT
    assert [c.length for c in import_trace(path, "qemu-trace", select="0x10").commands] == [65536, 79]


@pytest.mark.parametrize("line, message", [
    ("blk_co_pwritev blk 0xb0 bs 0x20 offset 0 bytes 512 flags 0x102", r"flags 0x102 \(NO_FALLBACK\) has no qemu-io"),
    ("blk_co_pwritev blk 0xb0 bs 0x20 offset 0 bytes 512 flags 0x22", "compressed zero write"),
    ("blk_co_pwritev blk 0xb0 bs 0x20 offset zero bytes 512 flags 0x0", ":1: malformed blk_co_pwritev event"),
    ("discard 0 65536", "no blk_co_pwritev or bdrv_co_pwritev_part events"),
])
def test_qemu_events_bad_input(tmp_path, line, message):
    with pytest.raises(ImportProblem, match=message):
        import_trace(_write(tmp_path, "t.log", line + "\n"), "qemu-trace")


def test_two_blockbackends_need_a_choice(tmp_path):
    text = ("blk_co_pwritev blk 0xb0 bs 0x20 offset 0 bytes 512 flags 0x0\n"
            "blk_co_pwritev blk 0xc0 bs 0x30 offset 512 bytes 512 flags 0x0\n")
    path = _write(tmp_path, "t.log", text)
    with pytest.raises(ImportProblem, match="2 BlockBackends"):
        import_trace(path, "qemu-trace")
    assert import_trace(path, "qemu-trace", select="0x30").commands[0].offset == 512


def test_patterns_are_deterministic_nonzero_and_seeded():
    a = [pattern_byte(1, i) for i in range(2000)]
    assert a == [pattern_byte(1, i) for i in range(2000)]
    assert 0 not in a and len(set(a)) == 255
    assert sum(x == y for x, y in zip(a, a[1:])) < 30  # neighbours differ almost always
    assert a != [pattern_byte(2, i) for i in range(2000)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "zero", "discard"]), st.integers(0, 60), st.integers(1, 20)),
                max_size=30),
       st.integers(0, 70), st.integers(1, 20))
def test_read_checks_match_a_byte_model(ops, roff, rlen):
    """GuestContent against a per-byte model: a read gets a pattern iff every byte holds it."""
    model: list[int | None] = [None] * 100
    content = GuestContent()
    for i, (op, off, n) in enumerate(ops):
        value = i + 1 if op == "write" else 0 if op == "zero" else None
        content.set(off, off + n, value)
        model[off:off + n] = [value] * n
    got = content.uniform(roff, roff + rlen)
    span = set(model[roff:roff + rlen])
    assert got == (span.pop() if len(span) == 1 else None)


def test_to_commands_output_parses_as_a_trace():
    recs = [GuestIO("write", 0, 512), GuestIO("zero", 512, 512, unmap=True), GuestIO("compressed", 65536, 65536),
            GuestIO("read", 0, 1024), GuestIO("flush"), GuestIO("discard", 0, 65536)]
    cmds, size = to_commands(recs, 3)
    text = "".join(c.to_qemu_io() + "\n" for c in cmds)
    assert [c.to_qemu_io() for c in parse_trace(text.splitlines(), "t")] == text.splitlines()
    assert size == 131072 and cmds[3].pattern is None  # half pattern, half zeros: no check


def test_cli_writes_all_or_nothing(tmp_path, capsys):
    good = _write(tmp_path, "a.log", V3)
    out = tmp_path / "out.trace"
    assert main(["trace", "import", good, "-o", str(out), "--from", "fio", "--pattern-seed", "7"]) == 0
    assert out.read_text() == import_trace(good, "fio", pattern_seed=7).to_text()
    said = capsys.readouterr().out
    assert "7 commands from /dev/x" in said and "needs a virtual size of at least 65536 bytes" in said
    bad = _write(tmp_path, "bad.log", "fio version 3 iolog\n1 /dev/x write 0\n")
    out2 = tmp_path / "out2.trace"
    assert main(["trace", "import", bad, "-o", str(out2), "--from", "fio"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.log:2:" in err
    assert not out2.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".qdebug")] == []
    assert main(["trace", "import", str(tmp_path / "missing.log"), "-o", str(out2), "--from", "fio"]) == 1
    assert "cannot read" in capsys.readouterr().err
