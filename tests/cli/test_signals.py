"""SIGTERM, SIGHUP and SIGINT stop a command the same way: the step under way finishes or is
rolled back, the command says so and exits 128+N; never a half-written image."""

from __future__ import annotations

import os
import random
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
    proc = subprocess.Popen([*QDEBUG, "replay", *(["--journal"] if journal else []), img, str(tmp_path / "t.trace")],
                            stderr=subprocess.PIPE)
    time.sleep(0.7)
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
    assert "repaired (journal step 1" in err and "interrupted before checking the result" in err
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
