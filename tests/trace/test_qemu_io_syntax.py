"""qemu-io 7.2's trace syntax, differentially: odd-but-valid and invalid lines through qemu-io and
through qdebug's parser and engine.

Each corpus line runs once through `qemu-io -c LINE` on a copy of a prepared image and once through
parse_line + WriteEngine on another copy. A line qemu-io rejects must be a SyntaxProblem carrying
qemu-io's own message; a line it accepts must parse (or be refused by name as Unsupported, which the
unit tests pin down) and leave the same guest data and byte-identical metadata (L1, L2 tables,
refcounts), failing at run time exactly where qemu-io fails (aio_* failures included, which qemu-io
reports without failing the command). (Compressed writes stay within one cluster: QEMU compresses the
clusters of one request in parallel threads, and which is packed first is a race in QEMU itself.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from qdebug.engine.file.chain import open_chain
from qdebug.engine.write.writer import WriteEngine
from qdebug.trace.commands import parse_line
from qdebug.trace.syntax import SyntaxProblem, Unsupported
from tests.engine.harness import assert_same_metadata, same_guest_data
from tests.qemu import QEMU_IO, create, qemu_io

# what the prepared image holds (4 MiB, 64 KiB clusters of 32 subclusters)
BASE = ["write -P 0x11 0 64k", "write -P 0x22 64k 32k", "write -z 128k 64k", "write -c -P 0x33 256k 64k",
        "write -P 0x44 4095k 1k"]
PATTERN_FILE = "pat"  # a 1000-byte file beside the images (write -s)

CORPUS = [
    # numbers: cvtnum's spellings
    "write 0 -P 5 1k", "write 5 -P 5 512", "write +5 512", "write 0x 512", "write 1.5k 512", "write 1. 512",
    "write 1.k 512", "write 0x1k 512", "write 0X10 512", "write 010 512", "write 0 1e", "write 1e3 512",
    "write 0 .5k", "write 0 1.5", "write 0 1.0", "write 1.0k 512", "write 1e-3k 512", "write 0.0005k 512",
    "write 0.9999k 1", "write 0.49951171875k 1", "write 0.5b 1", "write 1b 512", "write 1.b 1", "write 0 512B",
    "write 0x1.5k 512", "write 0x10.k 512", "write 00x10 512", "write 0x-1 512", "write 1-2 512",
    "write 0 9223372036854775807", "write 0 9223372036854775808", "write 0 18446744073709551616", "write 0 8E",
    "write 0 7.99E", "write 9e 1", "write 0 0x200", "write 0 \t512", "write 0 512\t", "write 0 \v1k",
    "write 0 512\r", "write 0x7fffffffffffffff 1", "write 0.99999999999999999999k 1",
    # patterns: strtol base 0
    "write -P -0 0 512", "write -P +5 0 512", "write -P 08 0 512", "write -P 0x 0 512", "write -P 0X1F 0 512",
    "write -P 1e2 0 512", "write -P\t5 0 512", "write -P 0777 0 1", "write -P 0377 0 1", "write -P -256 0 1",
    "write -P 99999999999999999999999 0 1", "write -P 1 -P 2 0 512",
    # getopt: bundles, attached arguments, permutation, --, bad options
    "write -qP5 0 512", "write -Pq 0 512", "write -- -P 5 0 512", "write 0 512 -P", "write --P 0 512",
    "write - 0 512", "write -P 5 0 -- 512", "write 0 -- 512", "write -5 0 1k", "write -x 0 1k", "write -p 0 1k",
    "write -P", "write 0", "write 0 1k 2k", " write 0 512", "write  0  512", "write 0 512 ", "write\t0 512",
    "write \t-P 5 0 512",
    # write: every option and their conflicts
    "write 0 0", "write 0 2147483136", "write 0 2147483137", "write -z 0 3g", "write -zn 0 3g", "write -zn 0 8E",
    "write -n 0 512", "write -z -u -n 0 512", "write -zn 0 4096", "write -zn 64k 2k", "write -zn 0 1k",
    "write -zn 100 64k", "write -z 0 1k", "write -zu 0 64k", "write -zuf 64k 64k", "write -zf 0 512",
    "write -z -P 0 0 512", "write -c -z 512k 64k", "write -c -z 1 512",
    "write -c 1 512", "write -c 0 100", "write -c -P 5 512k 64k", "write -c -P 5 0 64k", "write -c 512k 4M",
    "write -f -c 0 64k", "write -f 0 1k", "write -f -P 7 1M 3k", "write -b 0 100", "write -b -z 0 512",
    "write -f -b 0 512", "write -s pat 1M 3000", "write -s pat 1M 100", "write -s pat -P 5 0 1k",
    "write -z -s pat 0 1k", "write -s nonexistent 0 1k", "write -s /dev/null 0 1k", "write -s pat -s pat2 0 1k",
    "write -c -s pat 1M 64k", "write -s pat 0 0",
    "write -s pat 60k 10k", "write -s pat 1000 200k", "write -s pat2 33k 100k", "write -c -s pat2 1M 64k", "write 4M 1", "write 4095k 2k", "w 0 512", "W 0 512",
    # writev / aio_write
    "writev 0 0", "writev 0 512 0", "writev -P 9 1000 512 700 3", "writev 0 2147483137", "writev 0 2g 2g",
    "writev -z 0 512", "writev -f 0 512", "writev -P 300 0 512", "writev 0", "writev 4M 1",
    "aio_write -z 0 512 512", "aio_write -u 0 512", "aio_write -i -x", "aio_write -x -i", "aio_write -i",
    "aio_write 0 1000", "aio_write -z 0 3g", "aio_write -P 300 -i 0 1k", "aio_write -P 5 -z 0 512",
    "aio_write -c 0 512", "aio_write 0 0", "aio_write -f -z 0 512", "aio_write -zu 64k 64k",
    "aio_write -P 0x5a 100 512 512 1", "aio_write 4M 512",
    # read / readv / aio_read, with and without pattern checks
    "read -P 0x11 -s 10 -l 20 0 512", "read -P 0x12 -s 10 -l 20 0 512", "read -s 10 0 512",
    "read -P 0 -s 600 0 512", "read -P 0 -l 600 0 512", "read -P 0x11 -s 100 -l 412 0 512",
    "read -P 0x11 -s 100 -l 413 0 512", "read -P 0x11 -l 0 0 512", "read -P 0x11 -s 512 0 512",
    "read -P 0x11 -s 0x10 -l 1k 0 2k", "read -P 0x11 0 64k", "read -P 0x11 0 65537", "read -P 0 128k 64k",
    "read -P 0x33 256k 64k", "read -v 0 16", "read -b 1 512", "read -b 0 512", "read -p 0 512", "read -a 0 512",
    "read 0 2147483137", "read 0 2147483136", "read -q -C -v 0 1", "r -P 0x22 64k 32k", "read 4M 1",
    "readv -P 0x11 0 512", "readv -P 0x11 0 32k 32k 1", "readv 0", "readv -v 0 512 512",
    "readv -P 0x22 64k 16k 16k", "readv 4M 512",
    "aio_read -i 0", "aio_read -P 5 0 512", "aio_read -P 0x11 0 512", "aio_read -P 5 0", "aio_read 0 0",
    "aio_read -P 5 -i 0 512", "aio_read 4M 512",
    # discard, flush, the print-only commands, quit
    "discard -z 0 1k", "discard 0 2147483137", "discard 0 1k 2k", "discard -C -q 0 1k", "d 64k 64k",
    "discard 0 4M", "discard 4M 1", "flush", "flush 1", "f", "aio_flush", "aio_flush 1", "q", "quit a b c",
    "l", "length 1", "i", "info 1", "a 0", "a 0 1 2", "alloc x", "alloc 0 0x", "alloc 0 8E", "alloc 0 5",
    "alloc 1 1", "alloc \t0", "map", "map 1", "sleep x", "sleep 0x5", "sleep -1", "sleep 08", "sleep +5",
    "sleep 1 2", "help foo", "help write", "? write", "help write read", "foo", "",
]
RUNTIME_FAILURE = re.compile(r"(^|\n)(\w+ failed: |Pattern verification failed)")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("syntax")
    img = create(str(d / "base.qcow2"), "4M")
    qemu_io(img, *BASE)
    (d / PATTERN_FILE).write_bytes(bytes(range(250)) * 4)
    (d / "pat2").write_bytes(b"xyz")
    return d, img


def run_qemu_io(d, image: str, line: str) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IO, "-f", "qcow2", "-c", line, image], capture_output=True, cwd=d, timeout=60)


def first_message(out: str) -> str:
    """The first line qemu-io printed about the command (the warning on hex suffixes aside)."""
    lines = [ln for ln in out.splitlines() if ln and "deprecated" not in ln]
    return lines[0].removeprefix("qemu-io: ") if lines else ""


@pytest.mark.parametrize("line", CORPUS)
def test_line_means_what_it_means_to_qemu_io(base, tmp_path, monkeypatch, qemu, line):
    d, img = base
    mine, ref = str(tmp_path / "mine.qcow2"), str(tmp_path / "ref.qcow2")
    shutil.copyfile(img, mine)
    shutil.copyfile(img, ref)
    q = run_qemu_io(d, ref, line)
    out = q.stdout.decode(errors="replace") + q.stderr.decode(errors="replace")
    runtime_failure = bool(RUNTIME_FAILURE.search(out))
    qemu_accepts = q.returncode == 0 or runtime_failure
    monkeypatch.chdir(d)  # write -s names files relative to where qemu-io runs
    try:
        cmd = parse_line(line, 1)
    except Unsupported:
        return  # refused by name before anything is written (pinned by the unit tests)
    except SyntaxProblem as e:
        assert not qemu_accepts, f"qemu-io accepts {line!r} ({out.strip()!r}); qdebug: {e}"
        assert first_message(out) in str(e), f"qemu-io says {out!r}; qdebug: {e}"
        return
    assert qemu_accepts, f"qemu-io rejects {line!r}: {out.strip()!r}"
    error = None
    if cmd is not None and cmd.op != "quit":
        chain = open_chain(mine, writable=True)
        try:
            error = WriteEngine(chain).run(cmd).error
        finally:
            chain.close()
    assert (error is not None) == runtime_failure, f"{line!r}: qemu-io {out.strip()!r}, qdebug {error!r}"
    if error and "Pattern verification failed" in error:
        assert error in out
    assert same_guest_data(mine, ref), line
    assert_same_metadata(mine, ref)


def test_corpus_covers_every_command_qemu_io_lists(qemu, base):
    """Each command `help` lists appears in the corpus or in the unit tests' refused set."""
    d, img = base
    listed = {ln.split(" ", 1)[0] for ln in run_qemu_io(d, img, "help").stdout.decode().splitlines() if " -- " in ln}
    refused = {"abort", "break", "close", "open", "reopen", "remove_break", "resume", "sigraise", "truncate",
               "wait_break"}  # tests/trace/test_commands.py::test_what_qdebug_does_not_reproduce...
    used = {ln.split(" ", 1)[0] for ln in CORPUS if ln.strip()}
    from qdebug.trace.qemuio import BY_NAME
    assert listed == {s.name for s in BY_NAME.values()}
    assert listed - refused <= {BY_NAME[w].name for w in used if w in BY_NAME}


def test_refused_commands_are_safe_to_run_in_qemu_io_where_tested(base, qemu):
    """The refused commands qemu-io runs harmlessly do run there (so refusing them is a real gap,
    named, not a rejection qemu-io makes too)."""
    d, img = base
    for line in ("truncate 8M", "reopen -o lazy-refcounts=on", "close"):
        ref = str(d / "r.qcow2")
        shutil.copyfile(img, ref)
        assert run_qemu_io(d, ref, line).returncode == 0
        with pytest.raises(Unsupported):
            parse_line(line)
    os.unlink(str(d / "r.qcow2"))
