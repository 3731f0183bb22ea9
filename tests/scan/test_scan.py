"""`qdebug scan` end to end, against `qemu-img check`: a fleet holding every damage kind of the
corruption catalogue, files that are not images or cannot be read, QEMU's image locks, worker
processes that die, and the Dask mode (a LocalCluster of worker processes) giving the same lines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from tests.qemu import qemu_check, require_qemu
from tests.scan.fleet import make_templates

pytestmark = pytest.mark.qemu
SHAPES = ("ext64k", "ext16k", "std64k", "ext32k-snap", "ext64k-bitmaps")


def scan(*args: str, stdin=None, user: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`qdebug scan ARGS` as a separate process (the real worker processes start from it)."""
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run([*pre, sys.executable, "-m", "qdebug.cli", "scan", *args], capture_output=True,
                          input=stdin, timeout=timeout)


def lines(p: subprocess.CompletedProcess) -> dict[str, dict]:
    out = {}
    for line in p.stdout.decode().splitlines():
        r = json.loads(line)
        assert r["filename"] not in out
        out[r["filename"]] = r
    return out


def assert_like_qemu(path: str, record: dict) -> None:
    """The record of `path` has qemu-img check's counts, in its key order, and its exit code."""
    rc, theirs = qemu_check(path)
    if not theirs:  # qemu-img could not open it: an error record, or a check that failed likewise
        assert rc == 1 and ("error" in record or record["check-exit-code"] == 1), record
        return
    counts = {k: v for k, v in record.items() if k not in ("findings", "check-exit-code", "signatures")}
    assert counts == theirs and list(counts) == list(theirs), path
    assert record["check-exit-code"] == rc, path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Every template (healthy and damaged) in nested directories, with files that are not images."""
    require_qemu()
    root = tmp_path_factory.mktemp("fleet")
    healthy, damaged = make_templates(str(root / "templates"), SHAPES)
    images = root / "images"
    for i, src in enumerate(healthy + damaged):
        d = images / f"group{i % 3}" / ("deep" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d / f"{os.path.basename(src)[:-6]}.img")  # recognised by magic, not by name
    (images / "notes.txt").write_text("not an image\n")
    (images / "group0" / "disk.raw").write_bytes(b"\0" * 65536)
    (images / "group1" / "empty").write_bytes(b"")
    os.symlink("/nonexistent/target", images / "group2" / "dangling.qcow2")
    return images


def healthy(fleet) -> str:
    """A copy of a healthy template (damaged ones are named SHAPE--CORRUPTION)."""
    return str(min(p for p in fleet.rglob("*.img") if "--" not in p.name))


def test_every_damage_kind_counts_as_qemu_img(fleet):
    p = scan("--jobs", "2", "--output=json", str(fleet))
    records = lines(p)
    images = {os.path.join(d, f) for d, _, fs in os.walk(fleet) for f in fs if f.endswith(".img")}
    assert set(records) == images  # the raw, empty and text files are skipped, the dangling link too
    for path, record in records.items():
        assert "error" not in record, record
        assert_like_qemu(path, record)
    codes = {r["check-exit-code"] for r in records.values()}
    assert codes == {0, 1, 2, 3} and p.returncode == 2  # the worst verdict: corruptions
    summary = p.stderr.decode()
    assert "not qcow2 images" in summary and "worst images:" in summary


def test_text_output_is_a_summary(fleet):
    p = scan("--jobs", "1", str(fleet))
    out = p.stdout.decode()
    assert p.returncode == 2 and out.startswith("qdebug scan: ")
    for word in ("corrupt", "leaks", "check failed", "clean", "leaked in total", "skipped", "worst images:"):
        assert word in out, word
    assert p.stderr == b""  # no terminal: no progress bar


@pytest.fixture
def open_dir():
    """A directory every user may enter (pytest's tmp_path is private to its owner)."""
    d = tempfile.mkdtemp(prefix="qdebug-scan-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_files_that_cannot_be_checked(open_dir, fleet):
    """Named explicitly, everything gets a line: not qcow2, empty, truncated header, missing,
    a FIFO, a file this user may not read; none of them is a corruption (exit 1)."""
    src = healthy(fleet)
    d = open_dir
    paths = {}
    for name, data in (("text", b"hello\n"), ("empty", b""), ("truncated", open(src, "rb").read(50)),
                       ("good", open(src, "rb").read())):
        paths[name] = os.path.join(d, name)
        with open(paths[name], "wb") as f:
            f.write(data)
        os.chmod(paths[name], 0o644)
    paths["fifo"] = os.path.join(d, "fifo")
    os.mkfifo(paths["fifo"])
    paths["secret"] = os.path.join(d, "secret")
    shutil.copyfile(src, paths["secret"])
    os.chmod(paths["secret"], 0)
    paths["missing"] = os.path.join(d, "missing")
    user = 65534 if os.geteuid() == 0 else None  # root reads anything: scan as nobody
    if user is not None and not shutil.which("setpriv"):
        pytest.skip("setpriv is needed to scan as an unprivileged user")
    p = scan("--output=json", "--jobs", "2", *paths.values(), user=user)
    records = lines(p)
    assert set(records) == set(paths.values())
    errors = {name: records[path].get("error", "") for name, path in paths.items()}
    assert "check-exit-code" in records[paths["good"]] and errors["good"] == ""
    assert "not a qcow2 image" in errors["text"]
    assert errors["empty"] and errors["truncated"].startswith("header truncated")
    assert "not a regular file" in errors["fifo"] or "not a qcow2" in errors["fifo"]
    assert "ermission denied" in errors["secret"] and "No such file" in errors["missing"]
    assert p.returncode == 1 and b"Traceback" not in p.stderr


def test_a_file_a_writer_holds_is_an_error_unless_force_share(tmp_path, fleet):
    from tests.engine.file.test_locking import QemuIoHolder

    path = str(tmp_path / "held.qcow2")
    shutil.copyfile(healthy(fleet), path)
    holder = QemuIoHolder(path)
    try:
        p = scan("--output=json", path)
        assert 'Failed to get shared "write" lock' in lines(p)[path]["error"] and p.returncode == 1
        p = scan("--output=json", "-U", path)
        assert lines(p)[path]["check-exit-code"] == 0 and p.returncode == 0
        # `qdebug check` takes the same lock (one function checks a file for both)
        c = subprocess.run([sys.executable, "-m", "qdebug.cli", "check", path], capture_output=True)
        assert c.returncode == 1 and b'Failed to get shared "write" lock' in c.stderr
        c = subprocess.run([sys.executable, "-m", "qdebug.cli", "check", "-U", path], capture_output=True)
        assert c.returncode == 0 and c.stdout.startswith(b"No errors were found")
        c = subprocess.run([sys.executable, "-m", "qdebug.cli", "check", "-U", "-r", "leaks", path],
                           capture_output=True)
        assert c.returncode == 1 and b"read-only" in c.stderr
    finally:
        holder.close()


def test_paths_from_a_list(fleet, tmp_path):
    some = sorted(str(p) for p in (fleet / "group1").rglob("*.img"))[:4]
    listing = tmp_path / "list"
    listing.write_text("\n".join(some) + "\n\n")
    assert set(lines(scan("--output=json", "--from", str(listing)))) == set(some)
    assert set(lines(scan("--output=json", "--from", "-", stdin=("\n".join(some) + "\n").encode()))) == set(some)
    p = scan("--from", str(tmp_path / "nope"))
    assert p.returncode == 1 and b"cannot read the list" in p.stderr
    p = scan()
    assert p.returncode == 1 and b"nothing to scan" in p.stderr


def test_ctrl_c_stops_cleanly_and_resume_goes_on(fleet, tmp_path):
    """Paths come one by one on stdin; after two are done, SIGINT: exit 130 with the partial
    summary and a state holding those two; the resumed scan checks only the others."""
    images = sorted(str(p) for p in fleet.rglob("*.img"))[:6]
    state = str(tmp_path / "state")
    proc = subprocess.Popen([sys.executable, "-m", "qdebug.cli", "scan", "--jobs", "1", "--output=json",
                             "--resume", state, "--from", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(("\n".join(images[:2]) + "\n").encode())
    proc.stdin.flush()
    first = [proc.stdout.readline(), proc.stdout.readline()]  # both checked (JSON lines are streamed)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert {json.loads(x)["filename"] for x in first} == set(images[:2]) and out == b""
    assert b"scan interrupted: 2 images checked" in err and b"--resume STATE" in err
    with open(state) as f:
        assert len(f.read().splitlines()) == 3  # a header and the two images
    p = scan("--output=json", "--resume", state, *images)
    assert set(lines(p)) == set(images[2:])
    assert b"2 of them finished in an earlier run" in p.stderr
    again = scan("--resume", state, *images)
    assert b"6 of them finished in an earlier run" in again.stdout


def _dies_on_poison(items, *options):
    """check_chunk, except that the worker checking `poison.img` dies as if killed."""
    from qdebug.scan.task import check_chunk

    if any(path.endswith("poison.img") for path, _ in items):
        os._exit(9)
    return check_chunk(items, *options)


def test_a_dying_worker_costs_one_image(fleet, tmp_path, monkeypatch):
    """The pool breaks; every image it took down is tried once more on its own, in a new pool:
    only the one that kills its worker ends as an error."""
    from qdebug.scan import scan as scan_module
    from qdebug.scan.discover import discover
    from qdebug.scan.runners import LocalRunner

    images = sorted(str(p) for p in fleet.rglob("*.img"))[:12]
    poison = str(tmp_path / "poison.img")
    shutil.copyfile(images[0], poison)
    monkeypatch.setattr(scan_module, "check_chunk", _dies_on_poison)
    runner = LocalRunner(2)
    try:
        s = scan_module.Scan(discover([*images[:6], poison, *images[6:]]), runner)
        outcomes = {o.filename: o for o in s.run() if o is not None}
    finally:
        runner.close()
    assert set(outcomes) == {*images, poison}
    assert "died" in outcomes[poison].error and outcomes[poison].status == "error"
    assert all(outcomes[p].status == "checked" for p in images)


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as c:
        yield c


def test_dask_mode_gives_the_same_lines(fleet, cluster):
    local = scan("--jobs", "2", "--output=json", str(fleet))
    remote = scan("--dask", cluster.scheduler_address, "--output=json", str(fleet))
    assert remote.returncode == local.returncode == 2
    assert lines(remote) == lines(local)
    assert b"2 workers" in remote.stderr
    p = scan("--dask", cluster.scheduler_address, "--jobs", "2", str(fleet))
    assert p.returncode == 1 and b"--jobs" in p.stderr


def test_dask_scheduler_unreachable_is_one_line():
    p = scan("--dask", "tcp://127.0.0.1:9", "--dask-timeout", "2", "/nonexistent")
    assert p.returncode == 1 and p.stderr.decode().count("\n") == 1 and b"Dask scheduler" in p.stderr


def test_fifo_in_a_walked_directory_is_skipped(tmp_path, fleet):
    d = tmp_path / "walk"
    d.mkdir()
    os.mkfifo(d / "pipe")
    shutil.copyfile(healthy(fleet), d / "a.img")
    p = scan("--output=json", str(d))
    assert set(lines(p)) == {str(d / "a.img")} and p.returncode == 0
    assert stat.S_ISFIFO(os.stat(d / "pipe").st_mode)


def test_known_bug_signatures_in_lines_and_summary(tmp_path):
    """An image QEMU itself damaged (the compressed packing bug) and a truncated copy: their lines
    carry the signatures with evidence, the summary names them; --no-signatures leaves them out."""
    from tests.engine.check.test_signatures import PACKING_BUG, qemu_image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bug = qemu_image(tmp_path / "a", "7.2", PACKING_BUG)
    cut = qemu_image(tmp_path / "b", "7.2", ["write -P 0x11 0 1M"])
    os.truncate(cut, 800000)
    p = scan("--output=json", bug, cut)
    records = lines(p)
    assert [s["name"] for s in records[bug]["signatures"]] == ["compressed-into-data-cluster"]
    assert [s["name"] for s in records[cut]["signatures"]] == ["data-past-eof"]
    assert "refcount=2" in records[bug]["signatures"][0]["evidence"][0]
    text = scan(bug, cut).stdout.decode()
    assert "compressed-into-data-cluster: 1 image" in text and "QEMU 7.2.22, QEMU 10.0.2" in text
    assert "data-past-eof: 1 image" in text
    assert all(r["signatures"] is None for r in lines(scan("--output=json", "--no-signatures", bug, cut)).values())


def test_progress_bar_on_a_terminal(fleet):
    import pty

    master, slave = pty.openpty()
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "scan", "--jobs", "1", str(fleet)], stdout=subprocess.PIPE,
                       stderr=slave, timeout=120)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert p.returncode == 2 and p.stdout.startswith(b"qdebug scan: ")
    assert b"files" in shown and b"ETA" in shown and b"files/s" in shown and b"\r\x1b[K" in shown


def test_sigterm_prints_the_partial_summary_and_exits_by_the_signal(fleet):
    image = healthy(fleet)
    proc = subprocess.Popen([sys.executable, "-m", "qdebug.cli", "scan", "--jobs", "1", "--output=json",
                             "--from", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write((image + "\n").encode())
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["filename"] == image
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert b"scan interrupted: 1 image checked" in err and b"terminated by SIGTERM" in err and b"Traceback" not in err
