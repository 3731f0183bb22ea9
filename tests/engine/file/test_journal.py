"""Undo journal: every step undone restores the file byte for byte, crashes included."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdebug.engine.errors import QcowError
from qdebug.engine.file.image import open_image
from qdebug.engine.file.journal import Journal, JournalError, journal_path, journal_steps, undo
from tests.qemu import create

CS = 65536
FLOOR = 4096  # random writes stay off the header so intermediate states still parse


def digest(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        data = f.read()
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.fixture
def image(tmp_path, qemu):
    path = str(tmp_path / "a.qcow2")
    create(path, "64M")
    return path


@pytest.fixture
def fresh(image, tmp_path):
    """A new copy of the image per hypothesis example (examples share the function's fixtures)."""
    counter = iter(range(10**9))

    def make() -> str:
        path = str(tmp_path / f"copy{next(counter)}.qcow2")
        shutil.copyfile(image, path)
        return path
    return make


ops = st.one_of(
    st.tuples(st.just("w"), st.integers(FLOOR, 8 * CS), st.integers(1, 3 * CS), st.integers(0, 255)),
    # truncates keep the L1 table (cluster 3) inside the file, so every state still opens
    st.tuples(st.just("t"), st.integers(4 * CS, 8 * CS), st.just(0), st.just(0)),
)
traces = st.lists(st.lists(ops, min_size=0, max_size=6), min_size=1, max_size=8)


def apply_ops(img, step_ops):
    for kind, off, ln, byte in step_ops:
        if kind == "w":
            img.pwrite(off, bytes([byte]) * ln)
        else:
            img.truncate(off)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=traces, durable=st.booleans())
def test_random_steps_undo_one_by_one_byte_identical(fresh, trace, durable):
    image = fresh()
    states = [digest(image)]
    img = open_image(image, writable=True)
    j = Journal(img, durable=durable)
    for n, step_ops in enumerate(trace):
        j.begin({"step": n})
        apply_ops(img, step_ops)
        j.commit()
        states.append(digest(image))
    assert j.steps == len(trace)
    while j.steps:
        j.undo(1)
        assert digest(image) == states[j.steps]
    j.close()
    img.close()
    assert not os.path.exists(journal_path(image)), "an empty journal is removed"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=traces, back=st.integers(0, 8))
def test_undo_from_the_command_line_after_close(fresh, trace, back):
    image = fresh()
    states = [digest(image)]
    with open_image(image, writable=True) as img, Journal(img) as j:
        for n, step_ops in enumerate(trace):
            j.begin({"step": n})
            apply_ops(img, step_ops)
            j.commit()
            states.append(digest(image))
    assert [s.meta["step"] for s in journal_steps(image)] == list(range(len(trace)))
    res = undo(image, steps=back)
    n = min(back, len(trace))
    assert res.undone == n and not res.interrupted and res.remaining == len(trace) - n
    assert digest(image) == states[len(trace) - n]
    undo(image, steps=None) if res.remaining else None
    assert digest(image) == states[0]
    assert not os.path.exists(journal_path(image))


def test_steps_of_a_second_session_append_and_undo_all_spans_both(image):
    orig = digest(image)
    for byte in (1, 2):
        with open_image(image, writable=True) as img, Journal(img) as j:
            j.begin({"byte": byte})
            img.pwrite(CS * 4, bytes([byte]) * 5000)
            j.commit()
    assert len(journal_steps(image)) == 2
    assert undo(image, steps=None).undone == 2
    assert digest(image) == orig


def test_write_outside_a_step_is_refused(image):
    with open_image(image, writable=True) as img, Journal(img):
        before = digest(image)
        with pytest.raises(QcowError, match="outside a journaled step"):
            img.pwrite(8192, b"x")
        assert digest(image) == before


def test_repeated_writes_in_a_step_save_each_byte_once(image):
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        for _ in range(50):
            img.pwrite(8192, b"y" * 4096)
        j.commit()
        # the file header (the image's identity), one STEP, one before-image of 4096 bytes, one
        # CMIT, and per write only its announcement (a WRIT record: a header and one block
        # checksum): the before-image was saved once
        assert os.path.getsize(j.path) < j.starts[0] + 4096 + 400 + 50 * (48 + 4)


def test_growth_needs_no_before_image(image):
    size = os.path.getsize(image)
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        img.pwrite(size + 10 * CS, b"z" * (4 * CS))  # all past the end: nothing to save
        j.commit()
        assert os.path.getsize(j.path) < j.starts[0] + 400 + 4 * CS // 4096 * 4  # records and checksums only
        j.undo()
    assert os.path.getsize(image) == size


def test_big_before_images_stream_in_chunks(image, monkeypatch):
    import qdebug.engine.file.journal as jmod

    monkeypatch.setattr(jmod, "_CHUNK", 5000)  # force the chunked path on a small write
    with open_image(image, writable=True) as img:
        img_size = img.file_size
    orig = digest(image)
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        img.pwrite(FLOOR, b"\x5a" * (img_size - FLOOR))
        j.commit()
    undo(image, steps=1)
    assert digest(image) == orig


# ---- crashes ----------------------------------------------------------------------------------------
class Boom(Exception):
    pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=traces, fail_at=st.integers(0, 30))
def test_exception_from_a_hook_mid_step_is_rolled_back(fresh, trace, fail_at):
    image = fresh()
    """A failure between two writes of a step (the next write never happens) leaves no trace."""
    states = [digest(image)]
    img = open_image(image, writable=True)
    j = Journal(img)
    calls = [0]

    def bomb(offset, length, data=None):
        calls[0] += 1
        if calls[0] > fail_at:
            raise Boom

    img.write_hooks.append(bomb)  # runs after the journal's hook: the record exists, the image is untouched
    failed = False
    for step_ops in trace:
        j.begin()
        try:
            apply_ops(img, step_ops)
        except Boom:
            j.abort()
            failed = True
            break
        j.commit()
        states.append(digest(image))
    assert digest(image) == states[-1]
    if failed:
        assert j.steps == len(states) - 1
    j.undo(None)
    assert digest(image) == states[0]
    j.close()
    img.close()


CRASHER = textwrap.dedent("""
    import os, sys
    from qdebug.engine.file.image import open_image
    from qdebug.engine.file.journal import Journal
    path, kill_at, durable = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    img = open_image(path, writable=True)
    j = Journal(img, durable=durable)
    calls = [0]
    def killer(offset, length, data=None):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(9)  # like SIGKILL: no cleanup, no flush, no finally
    img.write_hooks.append(killer)
    j.begin({"n": 1})
    img.pwrite(8192, b"A" * 3000)
    j.commit()
    j.begin({"n": 2})
    img.pwrite(8192 + 1000, b"B" * 70000)
    img.truncate(img.file_size + 3 * 65536)
    img.pwrite(img.file_size - 100, b"C" * 5000)
    img.truncate(20000)
    img.pwrite(30000, b"D" * 9)
    j.commit()
    j.begin({"n": 3})  # growth only: no before-image, yet a crash must still truncate
    img.pwrite(img.file_size + 5, b"E" * 10)
    img.pwrite(img.file_size, b"F" * 10)
    j.commit()
    os._exit(0)
""")


@pytest.mark.parametrize("kill_at", range(1, 10))
@pytest.mark.parametrize("durable", [True, False])
def test_process_killed_mid_step_is_rolled_back_by_undo(tmp_path, qemu, kill_at, durable):
    image = str(tmp_path / "a.qcow2")
    create(image, "64M")
    orig = digest(image)
    p = subprocess.run([sys.executable, "-c", CRASHER, image, str(kill_at), "1" if durable else "0"])
    # kill_at 1: between step 1's journal record and its write; 2..6: inside step 2; 7, 8: inside
    # step 3; 9: never
    assert p.returncode == (0 if kill_at == 9 else 9)
    res = undo(image, steps=None)
    assert res.interrupted == (kill_at <= 8)
    assert res.undone == (0 if kill_at == 1 else 1 if kill_at < 7 else 2 if kill_at < 9 else 3)
    assert digest(image) == orig


def test_interrupted_step_is_rolled_back_when_a_new_journal_opens(tmp_path, qemu):
    image = str(tmp_path / "a.qcow2")
    create(image, "64M")
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        img.pwrite(8192, b"A" * 3000)
        j.commit()
    after_step1 = digest(image)
    subprocess.run([sys.executable, "-c", CRASHER.replace('j.begin({"n": 1})', 'j.begin({"n": 0})'), image, "4", "1"])
    assert digest(image) != after_step1
    with open_image(image, writable=True) as img:
        j = Journal(img)
        assert j.recovered and j.steps == 2
        assert digest(image) == after_step1
        j.close()


def test_torn_tail_record_is_ignored(image):
    orig = digest(image)
    with open_image(image, writable=True) as img:
        j = Journal(img)
        j.begin()
        img.pwrite(8192, b"Q" * 4000)
        # a crash while appending the next record: half a record at the tail, image not yet touched
        os.pwrite(j.fd, b"DATA\x00\x00", j.end)
        os.close(j.fd)
        j.fd = -1
    res = undo(image, steps=None)
    assert res.interrupted and res.undone == 0
    assert digest(image) == orig


def test_image_changed_behind_the_journal_is_refused(image):
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        img.pwrite(8192, b"Q" * 10)
        j.commit()
    with open(image, "ab") as f:
        f.write(b"\0" * 65536)  # someone else grew the image
    with pytest.raises(JournalError, match="changed after its undo journal"):
        undo(image, steps=1)


def test_image_rewritten_in_place_behind_the_journal_is_refused(image):
    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        img.pwrite(8192, b"Q" * 10)
        j.commit()
    time.sleep(0.02)  # past the file system's timestamp granularity
    with open(image, "r+b") as f:  # same length, new bytes: only the mtime tells
        f.seek(9000)
        f.write(b"someone else")
    changed = digest(image)
    with pytest.raises(JournalError, match="changed after its undo journal"):
        undo(image, steps=1)
    with open_image(image, writable=True) as img, pytest.raises(JournalError, match="changed after its undo"):
        Journal(img)
    assert digest(image) == changed


def test_undo_gives_back_the_mtime_of_the_state_it_restores(image):
    orig_mtime = os.stat(image).st_mtime_ns
    time.sleep(0.02)
    with open_image(image, writable=True) as img, Journal(img) as j:
        for n in range(3):
            j.begin()
            img.pwrite(8192 * (n + 1), b"Q" * 10)
            j.commit()
            time.sleep(0.02)
        j.undo(1)
    undo(image, steps=1)  # the CLI path accepts what the session left: lengths and mtimes agree
    undo(image, steps=1)
    assert os.stat(image).st_mtime_ns == orig_mtime


def test_undo_without_journal_says_so(image):
    with pytest.raises(JournalError, match="no undo journal"):
        undo(image)


def test_garbage_journal_is_rejected(image):
    with open(journal_path(image), "wb") as f:
        f.write(b"not a journal at all")
    with pytest.raises(JournalError, match="not a qdebug journal"):
        undo(image)


def test_memory_stays_bounded_while_the_journal_grows(image):
    """Before-images go to disk: neither many steps nor one huge overwrite pile up in RAM."""
    import tracemalloc

    with open_image(image, writable=True) as img, Journal(img) as j:
        j.begin()
        base = img.file_size
        img.pwrite(base, bytes(32 << 20))  # growth: nothing to save
        j.commit()
        big = b"\x77" * (32 << 20)
        tracemalloc.start()
        try:
            for i in range(300):
                j.begin({"i": i})
                img.pwrite(base + (i % 256) * CS, bytes([i % 256]) * CS)
                j.commit()
            _, many_steps_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            j.begin({"big": True})
            img.pwrite(base, big)  # a 32 MiB before-image, streamed in 4 MiB chunks
            j.commit()
            _, big_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert os.path.getsize(j.path) > 300 * CS + (32 << 20)
        assert many_steps_peak < 2 << 20
        assert big_peak < 12 << 20
        j.undo(None)
