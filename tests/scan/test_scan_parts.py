"""The parts of a scan one by one: discovery, resume state, the tally and its exit code, and the
scan loop's stop / resume with a runner of threads (the loop does not care where tasks run)."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import pytest

from qdebug.engine.errors import QcowError
from qdebug.engine.write.create import create_image
from qdebug.scan.discover import Candidate, Unusable, discover
from qdebug.scan.scan import Scan
from qdebug.scan.state import ScanState
from qdebug.scan.tally import Tally
from qdebug.scan.task import CHECKED, ERROR, SKIPPED, Outcome, check_one


class ThreadRunner:
    """The runner interface over threads: enough to drive the scan loop in tests."""

    workers = 2

    def __init__(self):
        self.pool = ThreadPoolExecutor(2)

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    @staticmethod
    def wait(handles, timeout):
        return wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)

    @staticmethod
    def result(handle):
        return handle.result()

    @staticmethod
    def cancel(handles):
        for h in handles:
            h.cancel()

    def close(self, *, wait=True):
        self.pool.shutdown(wait=wait)


@pytest.fixture
def tree(tmp_path):
    """a/1.qcow2, a/b/2.qcow2, a/notes, c.qcow2, a link to a directory and a dangling link."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    img = str(tmp_path / "c.qcow2")
    create_image(img, 1 << 20)
    shutil.copyfile(img, tmp_path / "a" / "1.qcow2")
    shutil.copyfile(img, tmp_path / "a" / "b" / "2.qcow2")
    (tmp_path / "a" / "notes").write_text("x")
    os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "linkdir")
    os.symlink(tmp_path / "nowhere", tmp_path / "a" / "dangling")
    return tmp_path


def test_discover_walks_in_name_order_without_following_directory_links(tree):
    found = list(discover([str(tree / "a"), str(tree / "c.qcow2"), str(tree / "missing")]))
    paths = [(f.path, f.explicit) for f in found if isinstance(f, Candidate)]
    assert paths == [(str(tree / "a" / "1.qcow2"), False), (str(tree / "a" / "b" / "2.qcow2"), False),
                     (str(tree / "a" / "notes"), False), (str(tree / "c.qcow2"), True)]
    assert [u.path for u in found if isinstance(u, Unusable)] == [str(tree / "missing")]
    c = found[-2]
    assert c.key == (str(tree / "c.qcow2"), os.path.getsize(tree / "c.qcow2"), os.stat(tree / "c.qcow2").st_mtime_ns)


def test_check_one_skips_walked_files_that_are_not_images(tree):
    assert check_one(str(tree / "a" / "notes"), False, False).status == SKIPPED
    o = check_one(str(tree / "a" / "notes"), True, False)
    assert o.status == ERROR and o.record == {"filename": str(tree / "a" / "notes"), "error": o.error, "check-exit-code": 1}
    o = check_one(str(tree / "c.qcow2"), False, False)
    assert o.status == CHECKED and o.record["check-exit-code"] == 0 and o.worker and o.worker_peak_rss > 0


def test_state_refuses_a_foreign_file_and_forgets_a_cut_line(tmp_path):
    foreign = tmp_path / "notes"
    foreign.write_text("my precious notes")
    with pytest.raises(QcowError, match="not a qdebug scan state file"):
        ScanState(str(foreign))
    assert foreign.read_text() == "my precious notes"
    path = str(tmp_path / "state")
    st = ScanState(path)
    st.record(("/x", 1, 2), Outcome("/x", CHECKED, 3, leaks=4, leaked_bytes=5, signatures=("s",)))
    st.record(("/y", 1, 2), Outcome("/y", ERROR, 1, error="nope"))
    st.close()
    with open(path, "a") as f:
        f.write('{"path": "/z", "si')  # killed while writing
    st = ScanState(path)
    assert st.finished(("/x", 1, 2)) == Outcome("/x", CHECKED, 3, leaks=4, leaked_bytes=5, signatures=("s",))
    assert st.finished(("/y", 1, 2)).error == "nope" and st.finished(("/x", 1, 3)) is None
    st.record(("/z", 1, 2), Outcome("/z", SKIPPED))
    st.close()
    rows = open(path).read().splitlines()
    assert len(rows) == 4 and json.loads(rows[-1])["path"] == "/z"  # the cut line is gone
    with open(path, "a") as f:
        f.write("garbage\n")
    with pytest.raises(QcowError, match=":5: damaged resume state line"):
        ScanState(path)


def test_tally_exit_code_is_the_worst_verdict():
    def code(*outcomes):
        t = Tally()
        for o in outcomes:
            t.add(o)
        return t.summary(1).exit_code

    clean, leaks = Outcome("a", CHECKED, 0), Outcome("b", CHECKED, 3, leaks=1)
    corrupt, failed = Outcome("c", CHECKED, 2, corruptions=1), Outcome("d", CHECKED, 1, check_errors=1)
    error, skipped = Outcome("e", ERROR, 1, error="x"), Outcome("f", SKIPPED)
    assert code(clean, skipped) == 0 and code(clean, leaks) == 3
    assert code(leaks, failed) == 1 and code(leaks, error) == 1
    assert code(error, corrupt, leaks, failed) == 2
    t = Tally()
    for i in range(30):
        t.add(Outcome(f"img{i}", CHECKED, 2 if i % 3 else 3, corruptions=i % 3 * i, leaks=i))
    worst = t.summary(1).worst
    assert len(worst) == 10 and [o.corruptions for o in worst] == sorted((o.corruptions for o in worst), reverse=True)
    assert worst[0].corruptions == 2 * 29 - 2 * 29 % 1 and all(o.exit_code == 2 for o in worst)


def test_stop_then_resume_checks_each_file_once(tree, tmp_path, monkeypatch):
    """One file in flight at a time: stopped after the third, exactly three are finished and
    recorded; the resumed scan checks the other seventeen, and again one whose mtime changed."""
    from qdebug.scan import scan as scan_module

    monkeypatch.setattr(scan_module, "CHUNK_FILES", 1)
    monkeypatch.setattr(scan_module, "IN_FLIGHT_PER_WORKER", 1)
    monkeypatch.setattr(ThreadRunner, "workers", 1)
    images = []
    for i in range(20):
        p = tmp_path / "fleet" / f"{i:02d}.qcow2"
        p.parent.mkdir(exist_ok=True)
        shutil.copyfile(tree / "c.qcow2", p)
        images.append(str(p))
    state = str(tmp_path / "state")
    s = Scan(discover([str(tmp_path / "fleet")]), ThreadRunner(), state=ScanState(state))
    first = []
    for o in s.run():
        if o is not None:
            first.append(o.filename)
            if len(first) == 3:
                s.stop()
    summary = s.summary()
    assert summary.interrupted and summary.exit_code == 130 and summary.images == len(first) == 3
    assert len(open(state).read().splitlines()) == 1 + 3
    os.utime(images[0], ns=(1, 1))  # changed since: checked again
    s = Scan(discover([str(tmp_path / "fleet")]), ThreadRunner(), state=ScanState(state))
    second = [o.filename for o in s.run() if o is not None]
    expect = set(images) - set(first) | {images[0]}
    assert sorted(second) == sorted(expect)
    summary = s.summary()
    assert images[0] in first  # files are handed out in name order
    assert summary.images == 20 and summary.resumed == 2
    assert summary.exit_code == 0 and not summary.interrupted
