"""`qdebug replay` without --journal (write-back windows) against `qemu-io -t writeback`: whole
replays, and a replay killed while it writes held-back metadata back (the next replay rolls the
image back to the previous flush)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qdebug.cli import main
from qdebug.engine.file.journal import journal_path, journal_steps
from tests.cli.test_write_cli import KILL_AT_NTH_WRITE, digest, qdebug, same_images, write_trace
from tests.engine.harness import assert_same_metadata
from tests.qemu import QEMU_IO, create, qemu_check, qemu_img
from tests.trace.random_traces import random_trace, strip_comments

SIZE = 4 << 20


def qemu_wb(image: str, lines: list[str]) -> str:
    p = subprocess.run([QEMU_IO, "-f", "qcow2", "-t", "writeback", image], capture_output=True,
                       input="\n".join(lines + ["quit"]).encode() + b"\n")
    return p.stdout.decode() + p.stderr.decode()


def _trace(seed: int, cs: int, n: int = 120) -> list[str]:
    lines = strip_comments(random_trace(seed, n, SIZE, cluster_size=cs,
                                        mix=(("write", 40), ("unaligned", 10), ("zero", 15), ("discard", 15),
                                             ("multi", 15), ("compressed", 5))))
    return [x for i, line in enumerate(lines) for x in ([line, "flush"] if i % 30 == 29 else [line])]


@pytest.mark.parametrize("cluster_size", ["512", "2k", "64k"])
def test_replay_with_flush_and_read_checks_matches_qemu_writeback(tmp_path, qemu, cluster_size):
    cs = {"512": 512, "2k": 2048, "64k": 65536}[cluster_size]
    lines = _trace(cs, cs)
    lines[40:40] = [f"write -P 0x7e {7 * cs + 3} {cs}", f"read -P 0x7e {7 * cs + 3} {cs}"]
    opts = dict(cluster_size=cluster_size, extended_l2=cs >= 16384)
    mine = create(str(tmp_path / "mine.qcow2"), SIZE, **opts)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE, **opts)
    out = qemu_wb(ref, lines)
    assert "Pattern verification failed" not in out
    assert main(["replay", "--keep-going", mine, write_trace(tmp_path / "t.trace", lines)]) in (0, 1)
    same_images(mine, ref)
    assert qemu_check(mine)[0] == qemu_check(ref)[0]
    assert os.path.getsize(mine) == os.path.getsize(ref)


# Kill the replay at the n-th image write of the k-th WriteEngine.flush.
KILL_IN_FLUSH = """
import os, sys
from qdebug.engine.file.image import Image
from qdebug.engine.write.writer import WriteEngine
from qdebug.cli import main
k, n = int(sys.argv[1]), int(sys.argv[2])
real_pwrite, real_flush = Image.pwrite, WriteEngine.flush
state = {"flushes": 0, "armed": False, "writes": 0}
def pwrite(self, offset, data):
    if state["armed"]:
        state["writes"] += 1
        if state["writes"] == n:
            os._exit(9)
    return real_pwrite(self, offset, data)
def flush(self):
    state["flushes"] += 1
    state["armed"] = state["flushes"] == k
    try:
        return real_flush(self)
    finally:
        state["armed"] = False
Image.pwrite, WriteEngine.flush = pwrite, flush
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("cluster_size,nth", [("512", 1), ("512", 5), ("64k", 2)])
@pytest.mark.parametrize("which", ["final", "second", "read"])
def test_replay_killed_in_a_flush_rolls_back_to_the_flush_before(tmp_path, qemu, cluster_size, nth, which):
    """Killed while writing the held-back metadata back (the final flush after the last line, or
    the one at the second `flush` line): the next replay of an empty trace rolls the image back to
    the flush before, which is what qemu-io made of the lines up to it."""
    cs = {"512": 512, "64k": 65536}[cluster_size]
    lines = _trace(cs + 1, cs, 100)
    flush_at = [i for i, line in enumerate(lines) if line == "flush"]
    assert len(flush_at) >= 3
    if which == "read":  # a `read -P` check writes the held-back metadata, but the window goes on
        lines[flush_at[1] + 10:flush_at[1] + 10] = [f"write -P 0x7e {5 * cs + 3} {cs}", f"read -P 0x7e {5 * cs + 3} {cs}"]
        flush_at = [i for i, line in enumerate(lines) if line == "flush"]
        k, keep = 3, flush_at[1] + 1
    elif which == "final":
        k = len(flush_at) + 1  # every flush line, then the one at the end
        keep = flush_at[-1] + 1
    else:
        k, keep = 2, flush_at[0] + 1
    opts = dict(cluster_size=cluster_size, extended_l2=cs >= 16384)
    image = create(str(tmp_path / "a.qcow2"), SIZE, **opts)
    trace = write_trace(tmp_path / "t.trace", lines)
    p = subprocess.run([sys.executable, "-c", KILL_IN_FLUSH, str(k), str(nth), "replay", "--keep-going", image, trace],
                       capture_output=True)
    assert p.returncode == 9, p.stderr.decode()[-2000:]
    (step,) = journal_steps(image)
    assert not step.committed and step.meta["index"] == keep
    p = qdebug("replay", image, write_trace(tmp_path / "empty", ["# nothing"]))
    assert p.returncode == 0 and b"rolled back a step an earlier run left unfinished" in p.stderr
    assert not os.path.exists(journal_path(image))
    # the image as a replay that stops at that flush leaves it, byte for byte
    prefix = create(str(tmp_path / "prefix.qcow2"), SIZE, **opts)
    main(["replay", "--keep-going", prefix, write_trace(tmp_path / "prefix.trace", lines[:keep])])
    assert digest(image) == digest(prefix)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE, **opts)
    qemu_wb(ref, lines[:keep])
    assert qemu_img("compare", "-q", image, ref, check=False).returncode == 0, "guest data differs"
    assert_same_metadata(image, ref)  # host offsets, tables, refcounts
    assert qemu_check(image)[0] == qemu_check(ref)[0]


def test_replay_flags_the_packing_hazard_with_small_windows(tmp_path, qemu):
    lines = ["write -c -P 0x67 0 64k", "flush", "write -P 0x35 1k 3k", "write -P 0x3c 1M 512", "flush",
             "write -c -P 0x8a 2M 64k", "read -P 0x8a 2M 64k"]
    image = create(str(tmp_path / "a.qcow2"), SIZE)
    ref = create(str(tmp_path / "ref.qcow2"), SIZE)
    qemu_wb(ref, lines)
    p = qdebug("replay", "--keep-going", image, write_trace(tmp_path / "t.trace", lines))
    assert b"hazard" in p.stderr and b":6:" in p.stderr
    same_images(image, ref)
    assert qemu_check(image)[0] == qemu_check(ref)[0] != 0


@pytest.mark.parametrize("cluster_size", ["512", "64k"])
def test_failed_read_check_stops_with_the_image_as_of_the_line_before(tmp_path, qemu, cluster_size):
    """A `read -P` that fails ends the replay (exit 1, TRACE:LINE): everything before it is written
    back, as qemu-io leaves the image after the same lines."""
    cs = {"512": 512, "64k": 65536}[cluster_size]
    lines = _trace(cs + 7, cs, 50)
    bad = len(lines) - 10
    lines.insert(bad, f"read -P 0xee {3 * cs} 512")  # nothing wrote 0xee
    opts = dict(cluster_size=cluster_size, extended_l2=cs >= 16384)
    image = create(str(tmp_path / "a.qcow2"), SIZE, **opts)
    trace = write_trace(tmp_path / "t.trace", lines)
    p = qdebug("replay", image, trace)
    assert p.returncode == 1 and f"{trace}:{bad + 1}: ".encode() in p.stderr
    ref = create(str(tmp_path / "ref.qcow2"), SIZE, **opts)
    qemu_wb(ref, lines[:bad])
    assert qemu_img("compare", "-q", image, ref, check=False).returncode == 0, "guest data differs"
    assert_same_metadata(image, ref)  # host offsets, tables, refcounts
    assert qemu_check(image)[0] == qemu_check(ref)[0] == 0
    assert not os.path.exists(journal_path(image))


@pytest.mark.parametrize("cluster_size,refcount_bits", [("512", 64), ("1k", 16), ("64k", 16)])
def test_tiny_write_back_bound_flushes_almost_every_step(tmp_path, qemu, monkeypatch, cluster_size, refcount_bits):
    """With the held-back bound at one page the windows end after nearly every command (header and
    refcount table rewritten and read back between steps while the refcount table grows)."""
    import qdebug.trace.replay as replay_module

    monkeypatch.setattr(replay_module, "WRITEBACK_LIMIT", 4096)
    cs = {"512": 512, "1k": 1024, "64k": 65536}[cluster_size]
    size = 8 << 20
    lines = strip_comments(random_trace(cs + refcount_bits, 150, size, cluster_size=cs,
                                        mix=(("write", 40), ("unaligned", 10), ("zero", 15), ("discard", 15),
                                             ("multi", 20))))
    lines += [f"write -P 0x42 0 {size // 2}", f"read -P 0x42 0 {size // 2}", f"discard 0 {size // 4}",
              f"write -P 0x43 {size // 2 + 100} {size // 4}"]
    opts = dict(cluster_size=cluster_size, extended_l2=cs >= 16384, refcount_bits=refcount_bits)
    mine = create(str(tmp_path / "mine.qcow2"), size, **opts)
    ref = create(str(tmp_path / "ref.qcow2"), size, **opts)
    out = qemu_wb(ref, lines)
    assert "Pattern verification failed" not in out
    assert main(["replay", mine, write_trace(tmp_path / "t.trace", lines)]) == 0
    same_images(mine, ref)
    assert qemu_check(mine)[0] == 0
    assert os.path.getsize(mine) == os.path.getsize(ref)


# test_write_cli's kill script, with Ctrl-C (KeyboardInterrupt) at the n-th write instead of a kill
INTERRUPT_AT_NTH_WRITE = KILL_AT_NTH_WRITE.split("\n        os._exit(9)")[0] + """
        raise KeyboardInterrupt
    return real(self, offset, data)
Image.pwrite = pwrite
try:
    sys.exit(main(sys.argv[2:]))
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("cluster_size", ["512", "2k"])
@pytest.mark.parametrize("nth", [9, 77])
def test_interrupted_replay_keeps_the_steps_before_and_takes_the_broken_one_out(tmp_path, qemu, cluster_size, nth):
    """Ctrl-C in the middle of a step (every step allocates, so its data went to clusters nothing
    references): the held-back metadata of the finished steps is written, the broken step's is not;
    the image is what qemu-io makes of the steps that finished, and clean."""
    cs = {"512": 512, "2k": 2048}[cluster_size]
    lines = [f"write -P {i % 250 + 1} {(i * 5 + i % 3) * cs + 100} {cs + cs // 2}" for i in range(100)]
    opts = dict(cluster_size=cluster_size, extended_l2=False)
    image = create(str(tmp_path / "a.qcow2"), SIZE, **opts)
    log = str(tmp_path / "log.jsonl")
    p = subprocess.run([sys.executable, "-c", INTERRUPT_AT_NTH_WRITE, str(nth), "replay", "--log", log, image,
                        write_trace(tmp_path / "t.trace", lines)], capture_output=True)
    assert p.returncode == 130, p.stderr.decode()[-2000:]
    with open(log) as f:
        done = sum(1 for _ in f)
    assert 0 < done < len(lines)
    assert not os.path.exists(journal_path(image))
    ref = create(str(tmp_path / "ref.qcow2"), SIZE, **opts)
    qemu_wb(ref, lines[:done])
    assert qemu_img("compare", "-q", image, ref, check=False).returncode == 0, "guest data differs"
    assert_same_metadata(image, ref)
    assert qemu_check(image)[0] == 0
