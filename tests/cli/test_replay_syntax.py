"""`qdebug replay` with the whole of qemu-io 7.2's trace syntax, against qemu-io reading the same
trace on stdin: same guest data, same metadata byte for byte, the same lines failing; lines qdebug
cannot reproduce refuse the trace before anything is written."""

from __future__ import annotations

import os
import re

import pytest

from qdebug.engine.file.journal import journal_path
from tests.cli.test_write_cli import SIZE, digest, qdebug, qemu_io_stdin, same_images, write_trace
from tests.qemu import create, qemu_check, qemu_io
from tests.trace.random_traces import random_syntax_trace

FIXED = [
    "write -P 0x11 0 64k",
    "writev -P 0x22 64k 512 1k 0x200",
    "aio_write -P 0x33 1000 4k 4k",
    "aio_flush",
    "readv -P 0x22 64k 1k 1k",
    "aio_read -P 0x33 1000 8k",
    "aio_flush",
    "read -P 0x11 -s 10 -l 20 0 64k",
    "read -P 0x99 -s 10 -l 20 0 64k",          # fails: the range holds 0x11
    "write 1.5M 4k -P 7",                      # options after the arguments
    "write -qfP0x44 2M 3k",
    "write -z -n 1M 2k",                       # whole subcluster: zeroed in the L2 table
    "write -zn 1000 100",                      # fails: QEMU would fall back to writing zeroes
    "write -c -z 3M 64k",                      # a zero write (-c only checks the alignment)
    "write -c -P 0x55 3M 64k",                 # a zero cluster has no host offset: compressed fine
    "write -c -P 0x56 3M 64k",                 # fails: compressed over an allocated cluster
    "write -s pat 100k 70k",
    "write -c -s pat 2560k 64k",
    "aio_write -z -u 0 4k",
    "aio_flush",
    "aio_write -P 1 4M 512",                   # fails at run time; qemu-io reports it and goes on
    "aio_flush",
    "aio_read -P 0x77 2M 3k",                  # a failed check qemu-io only reports
    "aio_flush",
    "read -P 0x44 2M 3k",
    "map", "info", "alloc 0 64k", "help write", "sleep 0", "length", "aio_write -i 0 1k",
    "discard 0x10000 0x10000",
    "flush",
    "write -f -P 0x66 3584k 8k",
    "quit",
    "write -P 0x77 0 4M",                      # after quit: never runs
]
FAILING = [FIXED.index(x) + 1 for x in ("read -P 0x99 -s 10 -l 20 0 64k", "write -zn 1000 100",
                                        "write -c -P 0x56 3M 64k")]
REPORTED = [FIXED.index(x) + 1 for x in ("aio_write -P 1 4M 512", "aio_read -P 0x77 2M 3k")]
_FAILURE = re.compile(r"^(\w+ failed: |Pattern verification failed)", re.M)


def qemu_outcomes(lines: list[str], stdout: str) -> tuple[list[int], list[int]]:
    """(lines that failed, aio lines whose failure qemu-io reported) from qemu-io's stdout on stdin:
    it prints a prompt before each line, and a line's output follows its prompt, except that an
    aio request completes (and reports) later: while the next line, an aio_flush in these traces,
    runs."""
    failed, reported = [], []
    for i, part in enumerate(stdout.split("qemu-io> ")[1:], 1):
        if _FAILURE.search(part):
            if lines[i - 1] == "aio_flush":
                reported.append(i - 1)
            else:
                failed.append(i)
    return failed, reported


def replay_both(tmp_path, lines, *extra):
    (tmp_path / "pat").write_bytes(bytes(range(7, 256)) * 5)
    trace = write_trace(tmp_path / "t.trace", lines)
    mine = create(str(tmp_path / "mine.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # write -s names its file relative to where the tool runs
    try:
        q = qemu_io_stdin(ref, lines)
        p = qdebug("replay", "--keep-going", *extra, mine, trace)
    finally:
        os.chdir(cwd)
    return trace, mine, ref, q, p


def qdebug_outcomes(trace: str, stderr: str) -> tuple[list[int], list[int]]:
    failed = re.findall(rf"qdebug: error: {re.escape(trace)}:(\d+): ", stderr)
    reported = re.findall(rf"qdebug: {re.escape(trace)}:(\d+): .*\(reported, as qemu-io does", stderr)
    return [int(n) for n in failed], [int(n) for n in reported]


@pytest.mark.parametrize("mode", [(), ("--journal",)])
def test_full_syntax_replays_as_qemu_io_runs_it(tmp_path, qemu, mode):
    trace, mine, ref, q, p = replay_both(tmp_path, FIXED, *mode)
    assert qemu_outcomes(FIXED, q.stdout.decode()) == (FAILING, REPORTED)  # the trace is what it claims
    assert qdebug_outcomes(trace, p.stderr.decode()) == (FAILING, REPORTED)
    assert p.returncode == 1
    same_images(mine, ref)
    assert qemu_check(mine)[0] == qemu_check(ref)[0] == 0


@pytest.mark.parametrize("seed", range(3))
def test_random_full_syntax_traces_replay_as_qemu_io(tmp_path, qemu, seed):
    lines = random_syntax_trace(seed, 120, SIZE)
    trace, mine, ref, q, p = replay_both(tmp_path, lines)
    expected = qemu_outcomes(lines, q.stdout.decode())
    assert qdebug_outcomes(trace, p.stderr.decode()) == expected, p.stderr.decode()
    assert p.returncode == (1 if expected[0] else 0)
    same_images(mine, ref)


def test_lines_qdebug_cannot_run_refuse_the_trace_before_anything_is_written(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    qemu_io(image, "write -P 0x11 0 64k")
    before = digest(image)
    lines = ["write -P 0x22 0 4k", "truncate 8M", "write -P 0x33 4k 4k", "writ 0 1k", "write -b 0 512", "q",
             "open other.qcow2"]
    trace = write_trace(tmp_path / "t.trace", lines)
    for extra in ((), ("--keep-going",), ("--journal",), ("--dry-run",)):
        p = qdebug("replay", *extra, image, trace)
        err = p.stderr.decode().splitlines()
        assert p.returncode == 1
        # every refused line, by number; a line qemu-io rejects too is refused only without --keep-going
        shown = [int(m.group(1)) for m in (re.match(rf"qdebug: error: {re.escape(trace)}:(\d+): ", ln) for ln in err)
                 if m]
        assert shown == ([2, 5] if "--keep-going" in extra else [2, 4, 5]), err
        assert "truncate is not supported" in err[0] and "nothing was written" in err[-1]
        assert "write -b (write to the VM state) is not supported" in "\n".join(err)
        assert digest(image) == before
        assert not os.path.exists(journal_path(image))


def test_lines_qemu_io_rejects_are_refused_up_front_or_skipped_with_keep_going(tmp_path, qemu):
    lines = ["write -P 0x11 0 64k", "write -u 0 4k", "write -P 0x22 64k 4k", "write 0 1k 2k"]
    trace = write_trace(tmp_path / "t.trace", lines)
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    before = digest(image)
    p = qdebug("replay", image, trace)
    assert p.returncode == 1 and digest(image) == before
    err = p.stderr.decode()
    assert f"{trace}:2: write: -u requires -z to be specified" in err and f"{trace}:4: write: wrong arguments" in err
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    q = qemu_io_stdin(ref, lines)
    assert q.returncode == 1  # qemu-io skips both bad lines, runs the rest and fails at the end
    p = qdebug("replay", "--keep-going", image, trace)
    assert p.returncode == 1 and p.stderr.decode().count("qdebug: error:") == 2  # each bad line, in its place
    same_images(image, ref)


def test_dos_line_endings_are_rejected_as_qemu_io_rejects_them(tmp_path, qemu):
    trace = tmp_path / "t.trace"
    trace.write_bytes(b"write -P 0x11 0 64k\r\nflush\r\n")
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    with open(trace, "rb") as f:
        import subprocess

        from tests.qemu import QEMU_IO
        q = subprocess.run([QEMU_IO, "-f", "qcow2", ref], stdin=f, capture_output=True)
    assert q.returncode == 1 and b"Parsing error" in q.stdout + q.stderr
    p = qdebug("replay", image, str(trace))
    assert p.returncode == 1 and "DOS line endings" in p.stderr.decode()
    same_images(image, ref)


def test_stdin_trace_is_checked_whole_before_it_runs(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    before = digest(image)
    p = qdebug("replay", image, "-", stdin=b"write -P 1 0 4k\nreopen -r\n")
    assert p.returncode == 1 and "<stdin>:2: reopen is not supported" in p.stderr.decode()
    assert digest(image) == before


@pytest.mark.parametrize("command,message", [
    ("writev -P 0x22 8k 1k 3k", None), ("aio_write -z 0 64k", None),
    ("map", "plan: map changes and checks nothing"), ("read -P 0 0 4k", "plan: read does not change the image"),
    ("truncate 8M", "plan: truncate is not supported"),
])
def test_plan_takes_the_full_syntax(tmp_path, qemu, command, message):
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    p = qdebug("plan", image, command)
    if message is None:
        assert p.returncode == 0 and p.stdout.decode().startswith(command)
    else:
        assert p.returncode == 1 and p.stderr.decode().startswith(f"qdebug: error: {message}")
