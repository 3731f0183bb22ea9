"""Locks on the backing chain, differential against qemu-img 7.2 (issue 17, items 1 and 10): a real
qemu-io holds the top image or one of its backing files for writing, and each read-only command
must fail (or not) as its qemu-img counterpart does, with qemu-img's words on one line.

Measured on qemu-img / qemu-io 7.2.22, chain base.qcow2 <- mid.qcow2 <- top.qcow2 (relative backing
names), `qemu-io -f qcow2 FILE` holding FILE for writing (qemu's two stderr lines shown joined by ": "):

| command                       | mid.qcow2 held                                   | top.qcow2 held          |
|-------------------------------|--------------------------------------------------|-------------------------|
| qemu-img info top             | 0 (opened without its backing file)              | 1 T                     |
| qemu-img info --backing-chain | 1 `Could not open 'mid.qcow2': Failed to get shared "write" lock: Is another process using the image [mid.qcow2]?` | 1 T |
| qemu-img map / check top      | 1 `Could not open 'top.qcow2': Could not open backing file: Failed to get shared "write" lock: Is another process using the image [mid.qcow2]?` | 1 T |
| qemu-img compare top x        | 2, the same words                                | 2 T                     |
| qemu-io -r -c 'read 0 4k' top | 1, the same after `can't open device top.qcow2:` | 1 T                     |
| any of them with -U           | 0                                                | 0                       |

T: `Could not open 'top.qcow2': Failed to get shared "write" lock: Is another process using the image
[top.qcow2]?`. One "Could not open backing file: " per level below the top (base.qcow2 held: two).
The bracket (and info --backing-chain's quoted name) is the backing file as QEMU resolved it: the
overlay's name as given up to its last "/", then the backing name (`../lk/top.qcow2` -> `../lk/mid.qcow2`,
`sub/top.qcow2` naming `../mid.qcow2` -> `sub/../mid.qcow2`; absolute names as they are). A backing
file held by a reader (`qemu-io -r`) refuses only writers (`Failed to get "write" lock`).
Which bytes (from /proc/locks and holders of single bytes): a reader holds 100 and refuses 201, 203;
`qemu-img info` opens without I/O: it holds nothing, so byte 200 held (another process refusing to
share "consistent read") fails map / check / qemu-io -r / -U (`Failed to get "consistent read" lock`)
but not info; -U holds 100 only (info -U nothing). A byte held exclusively: `Failed to lock byte 201`,
without the question. qdebug has no compare; layout and bundle read the image file alone (no backing
file), so they lock the top only; salvage, scan, plan, stats, replay --dry-run read through the chain
as qemu-io -r; whatif -b locks the backing file it plans on, named as given.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import time

import pytest

from tests.cli.test_scripts_contract import _wait_for_writer
from tests.qemu import QEMU_IMG, QEMU_IO, require_qemu

QDEBUG = [sys.executable, "-m", "qdebug.cli"]
U_HINT = " (-U reads it anyway; the results may be transient)"
QUESTION = "\nIs another process using the image ["


@pytest.fixture
def chain(tmp_path):
    """base.qcow2 <- mid.qcow2 <- top.qcow2 in tmp_path (relative backing names), data in each."""
    require_qemu()
    for name, backing in (("base", None), ("mid", "base.qcow2"), ("top", "mid.qcow2")):
        extra = ["-b", backing, "-F", "qcow2"] if backing else []
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", *extra,
                        f"{name}.qcow2", "4M"], cwd=tmp_path, check=True)
    (tmp_path / "t.trace").write_text("write -P 7 0 4k\n")
    return tmp_path


class Writer:
    """`qemu-io -f qcow2 FILE` waiting on its stdin: FILE open for writing, as a running QEMU."""

    def __init__(self, cwd, name: str):
        self.p = subprocess.Popen([QEMU_IO, "-f", "qcow2", name], cwd=cwd, stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_writer(str(cwd / name), self.p)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=20)


@pytest.fixture(params=["mid.qcow2", "base.qcow2", "top.qcow2"])
def held(request, chain):
    w = Writer(chain, request.param)
    yield request.param
    w.close()


def qemu_words(argv, cwd) -> tuple[int, str]:
    """qemu's status and message on one line (qemu-io's "can't open device X:" as qemu-img says it)."""
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    text = r.stderr.strip().replace(QUESTION, ": Is another process using the image [")
    for prog in ("qemu-img: ", "qemu-io: "):
        text = text.removeprefix(prog)
    if text.startswith("can't open device "):
        name, rest = text.removeprefix("can't open device ").split(": ", 1)
        text = f"Could not open '{name}': {rest}"
    return r.returncode, text


def qdebug_words(argv, cwd) -> tuple[int, str, str]:
    """qdebug's status, its error line (without the "qdebug: error: " and the -U hint), stdout."""
    r = subprocess.run([*QDEBUG, *argv], cwd=cwd, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("qdebug: warning:", "qdebug: note:"))]
    assert len(lines) <= 1, r.stderr
    line = lines[0].removeprefix("qdebug: error: ").removesuffix(U_HINT) if lines else ""
    return r.returncode, line, r.stdout


READ_0 = [QEMU_IO, "-r", "-c", "read 0 4k"]
# (qdebug command, its qemu counterpart or None (the image file alone: see the docstring), the
# status qdebug gives a lock refusal)
COMMANDS = [
    (["info", "{t}"], [QEMU_IMG, "info", "{t}"], 1),
    (["info", "--output=json", "{t}"], [QEMU_IMG, "info", "--output=json", "{t}"], 1),
    (["info", "--backing-chain", "{t}"], [QEMU_IMG, "info", "--backing-chain", "{t}"], 1),
    (["map", "{t}"], [QEMU_IMG, "map", "{t}"], 1),
    (["map", "--subclusters", "{t}"], [QEMU_IMG, "map", "{t}"], 1),
    (["read", "{t}", "0", "4k", "-o", "/dev/null"], [*READ_0, "{t}"], 1),
    (["check", "{t}"], [QEMU_IMG, "check", "{t}"], 1),
    (["layout", "{t}"], None, 1),
    (["bundle", "{t}", "-o", "bundle.qcow2"], None, 1),
    (["salvage", "{t}"], [*READ_0, "{t}"], 2),
    (["plan", "{t}", "write -P 1 0 4k"], [*READ_0, "{t}"], 1),
    (["stats", "{t}", "t.trace"], [*READ_0, "{t}"], 1),
    (["replay", "--dry-run", "{t}", "t.trace"], [*READ_0, "{t}"], 1),
]
IDS = [" ".join(a[:-1] if a[-1] == "{t}" else a[:2]) for a, _, _ in COMMANDS]


def _fill(argv, top: str) -> list[str]:
    return [a.format(t=top) for a in argv]


def _expected(qemu_argv, top: str, held_name: str, cwd) -> tuple[int, str]:
    if qemu_argv is not None:
        return qemu_words(_fill(qemu_argv, top), cwd)
    if held_name != "top.qcow2":  # the image file alone: a held backing file is no concern
        return 0, ""
    return qemu_words([QEMU_IMG, "map", top], cwd)  # refused as any reader of the top


@pytest.mark.parametrize("top", ["top.qcow2", "./top.qcow2"])
@pytest.mark.parametrize("argv,qemu_argv,status", COMMANDS, ids=IDS)
def test_a_held_file_is_refused_exactly_where_and_as_qemu_refuses(chain, held, argv, qemu_argv, status, top):
    want_status, want = _expected(qemu_argv, top, held, chain)
    got_status, got, stdout = qdebug_words(_fill(argv, top), chain)
    if want_status == 0:
        assert (got_status, got) == (0, ""), got
    else:
        assert "lock" in want and got_status == status
        assert got == want
        if argv[0] not in ("check", "salvage"):
            assert stdout == ""  # nothing printed as if the image could be read


@pytest.mark.parametrize("argv,qemu_argv,status", COMMANDS, ids=IDS)
def test_force_share_skips_the_locks_as_qemu_img_U(chain, held, argv, qemu_argv, status):
    if qemu_argv is not None:
        q = _fill(qemu_argv, "top.qcow2")
        assert subprocess.run([*q[:2], "-U", *q[2:]], cwd=chain, capture_output=True).returncode == 0
    got_status, got, _ = qdebug_words([*_fill(argv, "top.qcow2"), "-U"], chain)
    assert (got_status, got) == (0, "")


# Commands that write the top: a writer's locks on it, a reader's on the backing files, as
# `qemu-img check -r` and a writing qemu-io take them (no -U: writing needs the locks).
WRITERS = [
    (["check", "-r", "leaks", "top.qcow2"], [QEMU_IMG, "check", "-r", "leaks", "top.qcow2"]),
    (["repair", "top.qcow2"], [QEMU_IMG, "check", "-r", "all", "top.qcow2"]),
    (["repair", "--dry-run", "top.qcow2"], [QEMU_IMG, "check", "top.qcow2"]),
    (["replay", "top.qcow2", "t.trace"], [QEMU_IO, "-c", "write 0 4k", "top.qcow2"]),
]


@pytest.mark.parametrize("argv,qemu_argv", WRITERS, ids=[" ".join(a[:-1]) for a, _ in WRITERS])
def test_writers_of_the_top_are_refused_where_and_as_qemu_refuses(chain, held, argv, qemu_argv):
    before = {n: (chain / n).read_bytes() for n in ("top.qcow2", "mid.qcow2", "base.qcow2")}
    want = qemu_words(qemu_argv, chain)
    assert want[0] == 1 and "lock" in want[1]
    assert qdebug_words(argv, chain)[:2] == want
    assert before == {n: (chain / n).read_bytes() for n in before}


@pytest.mark.parametrize("argv", [["map", "--no-backing", "top.qcow2"], ["info", "--backing-chain", "--no-backing", "top.qcow2"],
                                  ["read", "--no-backing", "top.qcow2", "0", "4k", "-o", "/dev/null"]],
                         ids=["map", "info --backing-chain", "read"])
def test_no_backing_locks_no_backing_file(chain, argv):
    """--no-backing: the layer alone, as qemu-img opens json:{..., "backing": null}."""
    w = Writer(chain, "mid.qcow2")
    try:
        alone = 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}, "backing": null}'
        assert qemu_words([QEMU_IMG, "map", alone], chain) == (0, "")
        assert qdebug_words(argv, chain)[:2] == (0, "")
    finally:
        w.close()


def test_the_name_is_the_backing_file_as_qemu_resolves_it(chain):
    """An overlay in a sub-directory naming ../mid.qcow2, called by a path: the bracket says
    sub/../mid.qcow2 (qemu joins the names, it does not normalize them)."""
    (chain / "sub").mkdir()
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", "sub/o.qcow2"],
                   cwd=chain, check=True)
    w = Writer(chain, "base.qcow2")
    try:
        for argv, qemu_argv in ((["map", "sub/o.qcow2"], [QEMU_IMG, "map", "sub/o.qcow2"]),
                                (["info", "--backing-chain", "sub/o.qcow2"],
                                 [QEMU_IMG, "info", "--backing-chain", "sub/o.qcow2"]),
                                (["check", str(chain / "sub/o.qcow2")], [QEMU_IMG, "check", str(chain / "sub/o.qcow2")])):
            want = qemu_words(qemu_argv, chain)
            assert "[sub/../base.qcow2]" in want[1] or "/sub/../base.qcow2]" in want[1]
            assert qdebug_words(argv, chain)[:2] == want
    finally:
        w.close()


def test_a_reader_on_a_backing_file_refuses_nobody_that_reads(chain):
    holder = subprocess.Popen([QEMU_IO, "-r", "-f", "qcow2", "base.qcow2"], cwd=chain, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.engine.file.test_locking import locked_bytes

        while 100 not in locked_bytes(str(chain / "base.qcow2")):
            assert holder.poll() is None
            time.sleep(0.02)
        for argv in (["map", "top.qcow2"], ["check", "top.qcow2"], ["info", "--backing-chain", "top.qcow2"],
                     ["replay", "top.qcow2", "t.trace"]):  # a writer of the top reads its backing files only
            assert qdebug_words(argv, chain)[:2] == (0, ""), argv
    finally:
        holder.stdin.close()
        holder.wait(timeout=20)


def _hold_bytes(path, *bytes_: int, exclusive: bool = False) -> int:
    """An fd of `path` with OFD locks on `bytes_` (what QEMU does not take itself: a byte-level oracle)."""
    fd = os.open(path, os.O_RDWR)
    for b in bytes_:
        fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, 0, b, 1, 0))
    return fd


@pytest.mark.parametrize("where,bytes_,exclusive", [
    ("top.qcow2", (200,), False),  # another process refuses to share "consistent read"
    ("mid.qcow2", (200,), False),
    ("top.qcow2", (103,), False),  # another process resizes
    ("mid.qcow2", (201,), True),   # a byte held exclusively: "Failed to lock byte 201"
    ("top.qcow2", (100,), True),
], ids=["top-200", "mid-200", "top-103", "mid-201-exclusive", "top-100-exclusive"])
def test_each_permission_is_worded_as_qemu_words_it(chain, where, bytes_, exclusive):
    fd = _hold_bytes(str(chain / where), *bytes_, exclusive=exclusive)
    try:
        for argv, qemu_argv in ((["info", "top.qcow2"], [QEMU_IMG, "info", "top.qcow2"]),
                                (["info", "-U", "top.qcow2"], [QEMU_IMG, "info", "-U", "top.qcow2"]),
                                (["info", "--backing-chain", "top.qcow2"], [QEMU_IMG, "info", "--backing-chain", "top.qcow2"]),
                                (["map", "top.qcow2"], [QEMU_IMG, "map", "top.qcow2"]),
                                (["map", "-U", "top.qcow2"], [QEMU_IMG, "map", "-U", "top.qcow2"]),
                                (["check", "-U", "top.qcow2"], [QEMU_IMG, "check", "-U", "top.qcow2"]),
                                (["read", "top.qcow2", "0", "4k", "-o", "/dev/null"], [*READ_0, "top.qcow2"])):
            assert qdebug_words(argv, chain)[:2] == qemu_words(qemu_argv, chain), argv
    finally:
        os.close(fd)


def test_whatif_locks_the_backing_file_it_plans_on(chain):
    w = Writer(chain, "base.qcow2")
    try:
        status, line, _ = qdebug_words(["whatif", "--size", "4M", "-b", "base.qcow2", "-F", "qcow2",
                                        "--cluster-size", "64k", "t.trace"], chain)
        assert (status, line) == qemu_words([*READ_0, "base.qcow2"], chain)
    finally:
        w.close()


def test_qdebug_holding_a_backing_file_for_a_replay_stops_qemu_writers_of_it(chain):
    """The other direction: a `qdebug replay` of the top holds its backing files as a QEMU does."""
    proc = subprocess.Popen([*QDEBUG, "replay", "top.qcow2", "-"], cwd=chain, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_writer(str(chain / "top.qcow2"), proc)
        assert qemu_words([QEMU_IO, "-c", "write 0 4k", "base.qcow2"], chain) == (
            1, "Could not open 'base.qcow2': Failed to get \"write\" lock: Is another process using the image "
               "[base.qcow2]?")
    finally:
        proc.communicate("", timeout=30)
