"""SIGTERM, SIGHUP and SIGINT stop a command the same way: the step under way finishes or is
rolled back, the command says so and exits 128+N; never a half-written image."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qdebug.engine.file.journal import journal_path, journal_steps
from tests.faults.campaign import SIZE, _prefixes, make_trace, raw, trace_text
from tests.qemu import create, qemu_check

QDEBUG = [sys.executable, "-m", "qdebug.cli"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("journal", [False, True])
def test_a_signal_during_replay_stops_it_cleanly(tmp_path, qemu, sig, journal):
    img = create(str(tmp_path / "a.qcow2"), SIZE)
    start = raw(img, str(tmp_path / "s.raw"))
    trace = make_trace(random.Random(int(sig) * 7 + journal), 4000 if journal else 20000)
    (tmp_path / "t.trace").write_text(trace_text(trace))
    size = os.path.getsize(img)
    proc = subprocess.Popen([*QDEBUG, "replay", *(["--journal"] if journal else []), img, str(tmp_path / "t.trace")],
                            stderr=subprocess.PIPE)
    # once it writes (a signal before qdebug has started is Python's, not qdebug's; a loaded machine
    # may take seconds to get there)
    _wait_until(lambda: os.path.getsize(img) > size or proc.poll() is not None)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate()
    if proc.returncode == 0:
        pytest.skip("the replay finished before the signal came")  # (a very fast machine)
    name = signal.Signals(sig).name
    want = "qdebug: interrupted" if sig == signal.SIGINT else f"qdebug: terminated by {name}"
    assert proc.returncode == 128 + int(sig) and err.decode().strip().splitlines()[-1] == want, err
    assert qemu_check(img)[0] == 0
    steps = journal_steps(img)
    assert all(s.committed for s in steps) and (bool(steps) == journal)
    assert not journal or os.path.exists(journal_path(img))
    data = raw(img, str(tmp_path / "i.raw"))
    if journal:  # one step per command: the commands of the committed steps, exactly
        writes = [i for i, c in enumerate(trace) if c is not None]
        p = writes[len(steps) - 1] + 1 if steps else 0
        assert p in _prefixes(trace, start, data, 0, SIZE)
    else:
        # write-back: the commands before the interrupted one, and of that one (as of a QEMU write
        # interrupted half-way) at most the data it had written in place: every other byte as before
        assert _prefix_but_one(trace, start, data), "the guest data are those of a prefix of the trace"


@pytest.mark.parametrize("at_write", [1000, 2222, 3500])
def test_a_signal_in_the_middle_of_a_write_back_step_waits_for_its_end(tmp_path, qemu, monkeypatch, capsys, at_write):
    """SIGTERM delivered right after some host write of a write-back replay (the 3500th falls
    between QEMU's write-zeroes over [cow_start, cow_end) and the data write of a step that fills
    subclusters in place: cut there, the guest's old data in that range read as zeros). The step
    under way finishes: the guest data are exactly those of a prefix of the trace."""
    from qdebug.cli.main import install_signal_handlers, main
    from qdebug.engine.file import image as image_mod

    img = create(str(tmp_path / "a.qcow2"), SIZE)
    trace = make_trace(random.Random(14), 3000)
    (tmp_path / "t.trace").write_text(trace_text(trace))
    real, calls = image_mod.Image.pwrite, [0]

    def pwrite(self, offset, data):
        real(self, offset, data)
        calls[0] += 1
        if calls[0] == at_write:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(image_mod.Image, "pwrite", pwrite)
    old = signal.getsignal(signal.SIGTERM)
    install_signal_handlers()
    try:
        code = main(["replay", img, str(tmp_path / "t.trace")])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 143 and capsys.readouterr().err.strip().endswith("qdebug: terminated by SIGTERM")
    assert qemu_check(img)[0] == 0
    found = _prefixes(trace, np.zeros(SIZE, np.uint8), raw(img, str(tmp_path / "i.raw")), 0, SIZE)
    assert found and 0 < found[-1] < len(trace), "the guest data are those of a prefix of the trace"


def _wait_until(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "the command never got under way"
        time.sleep(0.01)


def _prefix_but_one(trace, start, data) -> bool:
    """Some p: data equal start with p commands applied, except inside command p+1's range, where
    each byte is as before it or as it writes."""
    model = start.copy()
    diff = int(np.count_nonzero(model != data))
    if diff == 0:
        return True
    for c in trace:
        if c is None:
            continue
        a, b = c[0], c[0] + c[1]
        inside = model[a:b] != data[a:b]
        if diff == np.count_nonzero(inside) and np.all(~inside | (data[a:b] == c[2])):
            return True
        diff += int(np.count_nonzero(data[a:b] != c[2])) - int(np.count_nonzero(inside))
        model[a:b] = c[2]
    return diff == 0


def _leak(img: str) -> None:
    with open(img, "r+b") as f:  # the L1 table's cluster counted twice: a leak to repair
        f.seek(2 * 65536 + 6)
        f.write(b"\x00\x02")


def test_an_interrupt_after_the_repair_committed_says_what_was_done(tmp_path, qemu, monkeypatch, capsys):
    from qdebug.cli.main import main
    from qdebug.engine.check import checker

    img = create(str(tmp_path / "a.qcow2"), "64M")
    _leak(img)
    real, calls = checker.check_image, [0]

    def check_then_interrupt(*a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the re-check after the commit
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(checker, "check_image", check_then_interrupt)
    assert main(["repair", img]) == 130
    err = capsys.readouterr().err
    assert "repaired (journal step 1" in err and "interrupted before the result was checked and reported" in err
    assert qemu_check(img)[0] == 0  # the repair was done
    assert [s.committed for s in journal_steps(img)] == [True]


def test_an_interrupt_in_the_middle_of_a_repair_rolls_it_back(tmp_path, qemu, monkeypatch, capsys):
    from qdebug.cli.main import main
    from qdebug.engine.file import image as image_mod

    img = create(str(tmp_path / "a.qcow2"), "64M")
    _leak(img)
    with open(img, "rb") as f:
        before = f.read()
    real = image_mod.Image.pwrite

    def interrupted(self, offset, data):
        real(self, offset, data)
        raise KeyboardInterrupt  # after the first write of the repair's step

    monkeypatch.setattr(image_mod.Image, "pwrite", interrupted)
    assert main(["repair", img]) == 130
    assert capsys.readouterr().err.strip().endswith("qdebug: interrupted")
    with open(img, "rb") as f:
        assert f.read() == before
    assert not os.path.exists(journal_path(img))


def test_a_replay_killed_mid_step_is_recovered_by_repair_before_it_plans(tmp_path, qemu):
    """`qdebug repair` after a kill: the lock, then the unfinished step rolled back, then the check
    and the plan (never a plan made on the torn image)."""
    img = create(str(tmp_path / "a.qcow2"), SIZE)
    trace = make_trace(random.Random(5), 1500)
    (tmp_path / "t.trace").write_text(trace_text(trace))
    proc = subprocess.Popen([*QDEBUG, "replay", "--journal", img, str(tmp_path / "t.trace")])
    time.sleep(0.7)
    proc.kill()
    proc.wait()
    p = subprocess.run([*QDEBUG, "repair", img], capture_output=True)
    assert p.returncode == 0, p.stderr
    assert qemu_check(img)[0] == 0
    assert all(s.committed for s in journal_steps(img))
    assert _prefixes(trace, np.zeros(SIZE, np.uint8), raw(img, str(tmp_path / "i.raw")), 0, SIZE)


def _invalid_subclusters(img: str) -> None:
    """Alloc bits of subclusters 12-15 set in every unallocated entry of seven L2 tables: ~28,000
    findings, which the repair fixes in three rounds (one journal step each), over seconds."""
    from qdebug.engine.file.image import open_image
    from tests.qemu import qemu_io

    qemu_io(img, *(f"write -q {i << 28} 4k" for i in range(7)))
    with open_image(img) as image:
        l2s = [image.l2_offset(i) for i in range(7)]  # (by L1 index)
    with open(img, "r+b") as f:
        for l2 in l2s:
            f.seek(l2)
            t = np.frombuffer(f.read(65536), dtype=">u8").copy().reshape(-1, 2)
            t[t[:, 0] == 0, 1] |= np.uint64(0xF000)
            f.seek(l2)
            f.write(t.tobytes())


@pytest.mark.parametrize("sig,delay", [(signal.SIGTERM, 0.0), (signal.SIGINT, 0.4), (signal.SIGTERM, 0.9),
                                       (signal.SIGHUP, 1.5)])
def test_a_signal_during_repair_leaves_whole_rounds(tmp_path, qemu, sig, delay):
    """A real signal at some point of a three-round repair: the command says so and exits 128+N,
    every journal step is whole (a round done or not begun), QEMU finds only the findings not yet
    repaired, and a second repair ends where one uninterrupted repair ends, byte for byte."""
    img, ref = str(tmp_path / "a.qcow2"), str(tmp_path / "ref.qcow2")
    create(img, "2G")
    _invalid_subclusters(img)
    shutil.copyfile(img, ref)
    before = qemu_check(img)[1]["corruptions"]
    assert subprocess.run([*QDEBUG, "repair", "-q", ref], capture_output=True).returncode == 0

    proc = subprocess.Popen([*QDEBUG, "repair", img], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_until(lambda: os.path.exists(journal_path(img)) or proc.poll() is not None)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate()
    lines = err.decode().strip().splitlines()
    if proc.returncode != 0:
        want = "qdebug: interrupted" if sig == signal.SIGINT else f"qdebug: terminated by {signal.Signals(sig).name}"
        assert proc.returncode == 128 + int(sig) and lines[-1] == want, err
    steps = journal_steps(img)
    assert all(s.committed for s in steps)
    code, counts = qemu_check(img)
    assert counts.get("leaks", 0) == 0 and counts.get("check-errors", 0) == 0
    assert counts.get("corruptions", 0) <= before and (code == 0) == (counts.get("corruptions", 0) == 0)
    if steps and proc.returncode != 0:
        assert any("journal step" in line for line in lines), err  # it says what it had done
    assert subprocess.run([*QDEBUG, "repair", "-q", img], capture_output=True).returncode == 0
    with open(img, "rb") as a, open(ref, "rb") as b:
        assert a.read() == b.read()
