"""`--strict` traces against qemu-io 7.2, both ways: every odd line of the corpus goes to qemu-io
on standard input (`qemu-io -f qcow2 IMAGE < TRACE`) and as `-c`, and to `qdebug replay --strict`
(a trace file, and `-c`) on copies of the same image. qdebug must accept exactly the lines qemu-io
accepts (refusing the others by line, with qemu-io's message), and leave the same guest data and
metadata. Without --strict qdebug differs only where the README says it does (comments, a byte
order mark, lines longer than 1023 bytes); that is pinned here too. Also: `quit`, `sleep` and
`aio_flush` as qemu-io runs them, and the README's traces through qemu-io itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdebug.cli import main
from qdebug.cli.common import one_line
from qdebug.trace.commands import check_trace
from tests.engine.harness import assert_same_metadata, same_guest_data
from tests.qemu import QEMU_IMG, QEMU_IO, create, qemu_io

BASE = ["write -P 0x11 0 64k", "write -P 0x22 64k 32k", "write -z 128k 64k"]
RUNTIME_FAILURE = re.compile(r"(^|\n)(qemu-io> )*(\w+ failed: |Pattern verification failed)")

# Each entry is one line of a trace, as bytes (a trailing "\n" is added for standard input).
CORPUS = [
    b"write -P 0x33 0 4k",
    # comments: qemu-io has none
    b"# a comment", b"#", b"write -P 0x33 0 4k # trailing", b"write -P 0x33 0 4k #", b"#write -P 0x33 0 4k",
    b"write -P 0x33 0 4k#", b"write -P 0x33 #0 4k",
    # line endings, byte order mark, blank lines
    b"write -P 0x33 0 4k\r", b"flush\r", b"\r", b"\xef\xbb\xbfwrite -P 0x33 0 4k", b"\xef\xbb\xbf", b"",
    b"   ", b"\t", b" \t ", b"\v", b"\f",
    # spaces and tabs between words
    b"   write -P 0x33 0 4k   ", b"write  -P  0x33  0  4k", b"write\t-P 0x33 0 4k", b"write -P 0x33 0\t4k",
    b"write -P 0x33 0 \t4k", b"write -P 0x33 \t0 4k", b"\twrite -P 0x33 0 4k", b"write -P\t0x33 0 4k",
    b"write -P 0x33 0 4k\t", b"flush\t", b"flush ", b" flush",
    # command names: case, aliases, abbreviations
    b"WRITE -P 0x33 0 4k", b"Write -P 0x33 0 4k", b"w -P 0x33 0 4k", b"wr -P 0x33 0 4k", b"writ 0 4k",
    b"W 0 4k", b"r -P 0x11 0 4k", b"d 64k 64k", b"f", b"q", b"Q", b"quit now", b"a 0", b"l", b"i", b"?",
    # quotes: no shell here
    b"'write' 0 4k", b'write -P "0x33" 0 4k', b"write '0' 4k", b"write -P 0x33 0 '4k'",
    # numbers: suffixes, bases, signs, overflow
    b"write 1k 1K", b"write 0 1M", b"write 1b 1B", b"write 0 1x", b"write 0 4kb", b"write 0 4 k",
    b"write 0x1000 0x1000", b"write 0X1000 4k", b"write 010 4k", b"write 0 010", b"write -1 4k",
    b"write 0 -4k", b"write +4k 4k", b"write 0 1.5k", b"write 0 1e3", b"write 0 99999999999999999999",
    b"write 0 9223372036854775807", b"write 0 8E", b"write 0 16E", b"write 4k 1T", b"write 0x 4k",
    b"write 0 ''",
    # patterns
    b"write -P 0x11 0 4k", b"write -P 256 0 4k", b"write -P -1 0 4k", b"write -P 0377 0 4k", b"write -P 08 0 4k",
    b"write -P 0x1FF 0 4k", b"write -P 1k 0 4k", b"write -P '' 0 4k", b"write -P 17 0 4k",
    # options: order, bundles, --, unknown, missing arguments, trailing garbage
    b"write 0 4k -P 0x33", b"write -P0x33 0 4k", b"write -qP 0x33 0 4k", b"write -- 0 4k", b"write -P 0x33 -- 0 4k",
    b"write -- -P 0x33 0 4k", b"write --pattern 0x33 0 4k", b"write -x 0 4k", b"write -P", b"write 0 4k extra",
    b"write 0", b"write", b"read 0 4k junk", b"flush now", b"discard -q 0 64k", b"discard 0 64k -q",
    # print-only commands and their arguments
    b"sleep 0", b"sleep 10", b"sleep 0x10", b"sleep 010", b"sleep 08", b"sleep -1", b"sleep 1k", b"sleep",
    b"aio_flush", b"aio_flush now", b"help", b"help write", b"help nope", b"map", b"length", b"info",
    # bytes that are not text
    b"write -P 0x33 0 4k\x00 and then anything", b"\x00write 0 4k", b"write\xff 0 4k", b"write -P 0x33 0 4k\xc3\xa9",
    b"\xc3\xa9crire 0 4k",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("strict")
    img = create(str(d / "base.qcow2"), "4M")
    qemu_io(img, *BASE)
    return d, img


def qemu_io_stdin(image: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IO, "-f", "qcow2", image], input=data, capture_output=True, timeout=60)


def qemu_io_c(image: str, text: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IO, "-f", "qcow2", "-c", text, image], capture_output=True, timeout=60)


def outcome(p: subprocess.CompletedProcess) -> tuple[bool, str]:
    """(qemu-io accepted the line, its first message): a command that ran and failed was accepted."""
    out = (p.stdout + p.stderr).decode(errors="surrogateescape").replace("qemu-io> ", "")
    accepted = p.returncode == 0 or bool(RUNTIME_FAILURE.search(out))
    lines = [ln for ln in out.splitlines() if ln.strip() and "deprecated" not in ln]
    return accepted, lines[0] if lines else ""


def decoded(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def qdebug_accepts(lines: list[str], strict: bool, fgets: bool | None = None) -> tuple[bool, str]:
    _count, problems = check_trace(lines, "t", strict, fgets)
    return not problems, "; ".join(str(e) for _n, e in problems)


def run_qdebug(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def same_images(mine: str, ref: str, what: str) -> None:
    assert same_guest_data(mine, ref), what
    assert_same_metadata(mine, ref)


@pytest.mark.parametrize("line", CORPUS, ids=[repr(x)[2:-1] or "empty" for x in CORPUS])
def test_strict_accepts_exactly_what_qemu_io_accepts(base, tmp_path, capsys, qemu, line):
    d, img = base
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    trace = tmp_path / "t.trace"
    trace.write_bytes(line + b"\n")
    text = decoded(line + b"\n")

    # standard input: qemu-io < TRACE against qdebug replay --strict TRACE
    shutil.copyfile(img, ref)
    shutil.copyfile(img, mine)
    q = qemu_io_stdin(ref, line + b"\n")
    q_accepts, q_says = outcome(q)
    accepts, says = qdebug_accepts([text], strict=True)
    assert accepts == q_accepts, f"qemu-io {'accepts' if q_accepts else 'rejects'} {line!r} ({q_says!r}); qdebug: {says}"
    if not accepts:
        assert q_says in says, f"qemu-io says {q_says!r}; qdebug: {says}"
    rc, err = run_qdebug(capsys, "replay", "--strict", "--keep-going", mine, str(trace))
    assert rc == (0 if q.returncode == 0 else 1), err
    if not accepts:
        assert f"{trace}:1: " in err and one_line(q_says) in err, err
    same_images(mine, ref, f"stdin: {line!r}")

    # -c: the same text as one argument (a C string: no NUL)
    if b"\0" not in line:
        shutil.copyfile(img, ref)
        shutil.copyfile(img, mine)
        q = qemu_io_c(ref, line)
        q_accepts, q_says = outcome(q)
        accepts, says = qdebug_accepts([decoded(line) + "\n"], strict=True, fgets=False)
        assert accepts == q_accepts, f"-c: qemu-io {q_accepts} ({q_says!r}); qdebug: {says}"
        rc, err = run_qdebug(capsys, "replay", "--strict", "--keep-going", mine, "-c", decoded(line))
        assert rc == (0 if q.returncode == 0 else 1), err
        same_images(mine, ref, f"-c: {line!r}")

    # without --strict: the same verdict, except where the README says qdebug accepts more
    lenient, _ = qdebug_accepts([text], strict=False)
    if lenient != q_accepts:
        assert lenient and (b"#" in line or line.startswith(b"\xef\xbb\xbf")), line


def test_the_corpus_has_both_verdicts_and_every_difference(base, qemu):
    """A corpus qemu-io accepts whole (or rejects whole) would test nothing."""
    d, img = base
    verdicts = {qdebug_accepts([decoded(x + b"\n")], strict=True)[0] for x in CORPUS}
    assert verdicts == {True, False}
    lenient_only = [x for x in CORPUS if qdebug_accepts([decoded(x + b"\n")], strict=False)[0]
                    and not qdebug_accepts([decoded(x + b"\n")], strict=True)[0]]
    assert any(x.startswith(b"#") for x in lenient_only) and any(b" #" in x for x in lenient_only)
    assert any(x.startswith(b"\xef\xbb\xbf") for x in lenient_only)


def long_lines() -> list[bytes]:
    """Lines around fgets' 1023 bytes: a command qemu-io reads whole, cut in two, or cut into two
    commands that both run."""
    cmd = b"write -P 0x44 0 4k"
    return [cmd + b" " * (1022 - len(cmd)),                 # 1022 bytes and the newline: one read
            cmd + b" " * (1023 - len(cmd)),                 # 1023: the newline is a second, empty read
            cmd + b" " * (1024 - len(cmd)),                 # 1024: a space is left for the second read
            b" " * 1020 + cmd,                              # the command cut: "wri" and "te ..."
            cmd + b" " * (1023 - len(cmd)) + b"flush",      # two commands, both run
            cmd + b" " * (1023 - len(cmd)) + b"write -P 0x55 4k 4k",
            b"writev -P 0x66 0" + b" 512" * 300,            # a long writev: cut in the middle of its lengths
            b"write -P 0x77 0 4k " + "é".encode() * 600]    # cut inside a UTF-8 character


@pytest.mark.parametrize("line", long_lines(), ids=lambda x: f"{len(x)}-bytes")
def test_long_lines_as_qemu_io_reads_them(base, tmp_path, capsys, qemu, line):
    """qemu-io reads standard input 1023 bytes at a time: a longer line is several commands, each
    accepted or refused on its own (-c takes it whole). --strict does the same, by line number."""
    d, img = base
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    shutil.copyfile(img, ref)
    shutil.copyfile(img, mine)
    trace = tmp_path / "t.trace"
    data = b"flush\n" + line + b"\nflush\n"
    trace.write_bytes(data)
    q = qemu_io_stdin(ref, data)
    rc, err = run_qdebug(capsys, "replay", "--strict", "--keep-going", mine, str(trace))
    assert rc == q.returncode, (q.stdout + q.stderr, err)
    q_messages = [m for m in (q.stdout + q.stderr).decode(errors="replace").replace("qemu-io> ", "").splitlines()
                  if m and not re.match(r"(wrote|read) \d+/\d+ bytes|[\d.]+ \w*i?B, \d+ ops", m)]
    mine_messages = [m for m in err.splitlines() if m.startswith("qdebug: error: ")]
    assert len(mine_messages) == len(q_messages), (q_messages, mine_messages)
    for m in mine_messages:
        assert m.startswith(f"qdebug: error: {trace}:2: "), m
        assert f"-byte line: qemu-io reads a trace 1023 bytes at a time)" in m, m
    same_images(mine, ref, f"{len(line)} bytes")


def test_quit_ends_the_trace_as_in_qemu_io(base, tmp_path, capsys, qemu):
    """`quit` (any arguments; `q`) ends the run: nothing after it is read, not even a bad line;
    the exit status is that of the lines before it. On stdin and with -c alike."""
    d, img = base
    lines = [b"write -P 0x33 0 4k", b"quit now", b"no such command", b"write -P 0x44 0 4k"]
    for strict in (["--strict"], []):
        ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
        shutil.copyfile(img, ref)
        shutil.copyfile(img, mine)
        trace = tmp_path / "t.trace"
        trace.write_bytes(b"\n".join(lines) + b"\n")
        q = qemu_io_stdin(ref, trace.read_bytes())
        assert q.returncode == 0
        rc, err = run_qdebug(capsys, "replay", *strict, mine, str(trace))
        assert rc == 0, err
        same_images(mine, ref, "quit on stdin")

        shutil.copyfile(img, ref)
        shutil.copyfile(img, mine)
        cs = [a for x in (b"write -P 0x55 4k 4k", b"q", b"nope", b"write -P 0x66 4k 4k") for a in (b"-c", x)]
        q = subprocess.run([QEMU_IO, "-f", "qcow2", *cs, ref], capture_output=True)
        assert q.returncode == 0
        rc, err = run_qdebug(capsys, "replay", *strict, mine, *[decoded(a) for a in cs])
        assert rc == 0, err
        same_images(mine, ref, "quit with -c")


def test_a_failure_before_quit_is_the_exit_status(base, tmp_path, capsys, qemu):
    d, img = base
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    shutil.copyfile(img, ref)
    shutil.copyfile(img, mine)
    trace = tmp_path / "t.trace"
    trace.write_bytes(b"nope\nwrite -P 0x33 0 4k\nquit\nwrite -P 0x44 0 4k\n")
    q = qemu_io_stdin(ref, trace.read_bytes())
    rc, err = run_qdebug(capsys, "replay", "--strict", "--keep-going", mine, str(trace))
    assert (q.returncode, rc) == (1, 1)
    assert f"{trace}:1: command \"nope\" not found" in err
    same_images(mine, ref, "a failure, then quit")


def holds_the_image(image: str, argv: list[str], ms: int) -> tuple[float, bool]:
    """Run `argv` (a trace ending in `sleep ms`): how long it took, and whether qemu-img was
    refused the image (its write lock held) while it slept."""
    from tests.engine.file.test_locking import locked_bytes

    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    refused = False
    # qemu-img info takes (and refuses to share) locks of its own: asked before the writer holds
    # its write lock, it could refuse the writer instead. Ask once the write lock is held.
    while p.poll() is None and 101 not in locked_bytes(image):
        time.sleep(0.005)
    while p.poll() is None:
        info = subprocess.run([QEMU_IMG, "info", image], capture_output=True)
        if b'Failed to get shared "write" lock' in info.stderr:
            refused = True
        time.sleep(0.05)
    assert p.returncode == 0, p.stderr.read()
    return time.monotonic() - t0, refused


def test_sleep_waits_holding_the_image_as_qemu_io_does(base, tmp_path, qemu):
    """`sleep N` waits N milliseconds (strtol: 0x200 is 512) with the image open and locked, as
    iotests use it to hold an image; --dry-run plans and does not wait."""
    d, img = base
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    shutil.copyfile(img, ref)
    shutil.copyfile(img, mine)
    took, refused = holds_the_image(ref, [QEMU_IO, "-f", "qcow2", "-c", "write -P 0x33 0 4k", "-c", "sleep 0x300",
                                          ref], 0x300)
    assert took >= 0.768 and refused
    took, refused = holds_the_image(mine, [sys.executable, "-m", "qdebug.cli", "replay", "--strict", mine,
                                           "-c", "write -P 0x33 0 4k", "-c", "sleep 0x300"], 0x300)
    assert took >= 0.768 and refused
    same_images(mine, ref, "sleep")
    t0 = time.monotonic()
    assert main(["replay", "--dry-run", mine, "-c", "sleep 5000"]) == 0
    assert time.monotonic() - t0 < 4


def test_aio_flush_as_in_qemu_io(base, tmp_path, capsys, qemu):
    """aio requests complete before `aio_flush` returns: the read after it sees the write (qdebug
    runs aio requests in order, so for it they are always complete)."""
    d, img = base
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    shutil.copyfile(img, ref)
    shutil.copyfile(img, mine)
    trace = tmp_path / "t.trace"
    trace.write_bytes(b"aio_write -P 0x35 0 4k\naio_write -P 0x36 1M 64k\naio_flush\nread -P 0x35 0 4k\n"
                      b"read -P 0x36 1M 64k\n")
    q = qemu_io_stdin(ref, trace.read_bytes())
    assert q.returncode == 0 and b"Pattern verification failed" not in q.stdout
    rc, err = run_qdebug(capsys, "replay", "--strict", mine, str(trace))
    assert rc == 0, err
    assert same_guest_data(mine, ref)


def test_stdin_that_is_not_utf8_is_refused_by_line(base, tmp_path, qemu):
    """Bytes that are not UTF-8 on standard input, whatever the locale: refused with the line's
    number where qemu-io refuses them, never an internal error."""
    d, img = base
    mine = str(tmp_path / "mine.qcow2")
    shutil.copyfile(img, mine)
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "replay", "--strict", mine, "-"],
                       input=b"write -P 0x33 0 4k\nwrite\xff 0 4k\n", capture_output=True,
                       env={"PATH": "/usr/bin:/bin", "LANG": "en_US.UTF-8", "LC_ALL": "C.UTF-8"})
    assert p.returncode == 1
    assert p.stderr.decode().startswith("qdebug: error: <stdin>:2: command \"write"), p.stderr


def test_plan_stats_whatif_take_strict(base, tmp_path, capsys, qemu):
    d, img = base
    mine = str(tmp_path / "mine.qcow2")
    shutil.copyfile(img, mine)
    assert main(["plan", mine, "write -P 0x33 0 4k # why"]) == 0
    rc, err = run_qdebug(capsys, "plan", "--strict", mine, "write -P 0x33 0 4k # why")
    assert rc == 1 and "write: wrong arguments" in err and "qemu-io has no comments" in err
    trace = tmp_path / "t.trace"
    trace.write_text("# a workload\nwrite -P 0x33 0 4k\n")
    assert main(["stats", mine, str(trace)]) == 0
    rc, err = run_qdebug(capsys, "stats", "--strict", mine, str(trace))
    assert rc == 1 and f'{trace}:1: command "#" not found' in err
    rc, err = run_qdebug(capsys, "whatif", "--strict", "--size", "4M", "--cluster-size", "64k", str(trace))
    assert rc == 1 and f'{trace}:1: command "#" not found' in err


README = Path(__file__).resolve().parents[2] / "README.md"
HEREDOC = re.compile(r"^\$ cat > (\S+\.trace) <<'?EOF'?\n(.*?)^EOF$", re.M | re.S)


def test_readme_traces_run_in_qemu_io(tmp_path, qemu):
    """The README says `qemu-io IMAGE < TRACE` runs its traces: each one does, with no line refused,
    and --strict accepts it."""
    traces = HEREDOC.findall(README.read_text())
    assert len(traces) >= 2
    for name, body in traces:
        img = create(str(tmp_path / "r.qcow2"), "64M")
        q = qemu_io_stdin(img, body.encode())
        out = (q.stdout + q.stderr).decode()
        assert q.returncode == 0 or RUNTIME_FAILURE.search(out), f"{name}: {out}"
        assert "not found" not in out and "usage" not in out.lower(), f"{name}: {out}"
        assert qdebug_accepts(body.splitlines(keepends=True), strict=True) == (True, ""), name
