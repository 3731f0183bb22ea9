"""qdebug in shell scripts and CI (issue 17): every command that reads an image, run as a script
runs it: a pipe closed early, a closed or full stdout, no terminal, a read-only filesystem, a
writer holding the image (a real qemu-io, and a running `qdebug replay`), and `-U`.

The oracle for locks and statuses is qemu-img itself where it has the command (its message
`Failed to get shared "write" lock`, exit 1; EPIPE ends with the command's own status).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.engine.corruptions import corrupt
from tests.qemu import create, qemu_io, require_qemu

QDEBUG = [sys.executable, "-m", "qdebug.cli"]
LOCK_MESSAGE = 'Failed to get shared "write" lock'


def qd(*args, stdin=subprocess.DEVNULL, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*QDEBUG, *map(str, args)], capture_output=True, text=True, stdin=stdin, timeout=60, **kw)


def sh(script: str, **env) -> subprocess.CompletedProcess:
    """A bash script with `qdebug` meaning this checkout's CLI."""
    full = f"set -o pipefail\nqdebug() {{ {' '.join(QDEBUG)} \"$@\"; }}\n{script}"
    return subprocess.run(["bash", "-c", full], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("qdebug: warning:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qdebug: error: ") and "internal error" not in lines[0], stderr
    return lines[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 64 MiB image with 600 scattered data clusters (map's output is longer than a pipe holds)."""
    require_qemu()
    d = tmp_path_factory.mktemp("contract")
    path = str(d / "k.qcow2")
    create(path, "64M", cluster_size="16k")
    trace = d / "w.trace"
    trace.write_text("".join(f"write -P 0x{i % 250 + 1:x} {i * 96}k 4k\n" for i in range(600)))
    assert qd("replay", path, trace).returncode == 0
    return path


# Every command that reads an image without changing it, as a script calls it ({img}: the image,
# {out}: a file it may write beside). The exit status when a writer holds the image: 1 as
# qemu-img (salvage: 2, its 1 means "something lost").
READERS = [
    (["info", "{img}"], 1),
    (["info", "--output=json", "{img}"], 1),
    (["map", "{img}"], 1),
    (["map", "--output=json", "{img}"], 1),
    (["map", "--subclusters", "--output=json", "{img}"], 1),
    (["read", "{img}", "0", "1M"], 1),
    (["check", "{img}"], 1),
    (["check", "--output=json", "{img}"], 1),
    (["layout", "{img}"], 1),
    (["salvage", "{img}"], 2),
    (["bundle", "{img}", "-o", "{out}"], 1),
    (["plan", "{img}", "write -P 1 0 4k"], 1),
    (["replay", "--dry-run", "{img}", "{trace}"], 1),
]
IDS = [" ".join(a) for a, _ in READERS]


def _argv(argv, img, tmp_path) -> list[str]:
    trace = tmp_path / "t.trace"
    if not trace.exists():
        trace.write_text("write -P 7 0 4k\ndiscard 64k 64k\n")
    return [a.format(img=img, out=tmp_path / "out.qcow2", trace=trace) for a in argv]


def _wait_for_writer(path: str, proc) -> None:
    """Until `proc` holds the write permission's lock byte (looked at without taking a lock: a
    probe such as `qemu-img info` would itself make the writer's open fail)."""
    from qdebug.engine.file.locking import LOCK_BASE_HELD, PERM_WRITE, byte_locked_by_others

    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 60
        while not byte_locked_by_others(fd, LOCK_BASE_HELD + PERM_WRITE):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the writer did not take its locks"
            time.sleep(0.05)
    finally:
        os.close(fd)


@pytest.fixture
def held(image, tmp_path):
    """The image opened for writing by a real qemu-io (waiting on its stdin), as a running QEMU."""
    path = str(tmp_path / "held.qcow2")
    shutil.copy(image, path)
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_writer(path, proc)
    yield path
    proc.stdin.close()
    proc.wait(timeout=20)


@pytest.mark.parametrize("argv,status", READERS, ids=IDS)
def test_a_writer_holding_the_image_is_refused_as_qemu_img_does(held, tmp_path, argv, status):
    before = open(held, "rb").read()
    r = qd(*_argv(argv, held, tmp_path))
    assert r.returncode == status, r.stderr
    line = one_error_line(r.stderr)
    assert LOCK_MESSAGE in line and held in line
    assert "-U" in line  # the message names the way to read anyway
    assert r.stdout == "" or argv[0] in ("check", "salvage")  # nothing printed as if the image were fine
    assert open(held, "rb").read() == before


@pytest.mark.parametrize("argv", [a for a, _ in READERS], ids=IDS)
def test_force_share_reads_anyway_and_says_results_may_be_transient(held, tmp_path, argv):
    r = qd(*_argv(argv, held, tmp_path), "-U")
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "-U" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("qdebug: warning: ") and "transient" in warnings[0]


def test_qemu_img_agrees_on_the_held_image(held):
    """The oracle: qemu-img info / map / check refuse the same image, exit 1, same words."""
    for cmd in ("info", "map", "check"):
        q = subprocess.run(["qemu-img", cmd, held], capture_output=True, text=True)
        assert q.returncode == 1 and LOCK_MESSAGE in q.stderr
        assert qd(cmd, held).returncode == 1


def test_a_running_qdebug_replay_holds_the_image_against_readers(image, tmp_path):
    """The report of issue 17: `check` during a replay gave a false "corruption" (exit 2)."""
    path = str(tmp_path / "r.qcow2")
    shutil.copy(image, path)
    # a trace on stdin is read after the locks are taken: the replay holds the image until stdin ends
    proc = subprocess.Popen([*QDEBUG, "replay", path, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_writer(path, proc)
        for argv in (["check", path], ["info", path], ["map", path], ["read", path, "0", "4k"]):
            r = qd(*argv)
            assert r.returncode == 1 and LOCK_MESSAGE in one_error_line(r.stderr), (argv, r.stderr)
    finally:
        proc.communicate("write -P 3 0 4k\n", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert qd("check", path).returncode == 0


# ---- streams ------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [a for a, _ in READERS], ids=IDS)
def test_a_pipe_closed_early_ends_quietly_with_the_commands_status(image, tmp_path, argv):
    cmd = " ".join(f"'{a}'" for a in _argv(argv, image, tmp_path))
    r = sh(f"qdebug {cmd} | head -c 1 >/dev/null")
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr and "Traceback" not in r.stderr and "Exception" not in r.stderr


def test_pipe_status_matches_qemu_img(image):
    """`set -o pipefail; qemu-img map --output=json big | head -1` exits 0: so does qdebug."""
    q = sh(f"qemu-img map --output=json '{image}' | head -1 >/dev/null")
    r = sh(f"qdebug map --output=json '{image}' | head -1 >/dev/null")
    assert q.returncode == r.returncode == 0 and r.stderr == ""


def test_a_closed_pipe_keeps_checks_verdict(image, tmp_path):
    """EPIPE must not turn check's "corruptions" (2) into success, nor into an error."""
    path = str(tmp_path / "c.qcow2")
    shutil.copy(image, path)
    corrupt(path, "refcount_down")
    q = subprocess.run(["qemu-img", "check", path], capture_output=True)
    assert q.returncode == 2
    for output in ("human", "json"):
        r = sh(f"qdebug check --output={output} '{path}' | head -c0; exit ${{PIPESTATUS[0]}}")
        assert r.returncode == q.returncode, r.stderr
        assert "qdebug: error" not in r.stderr


@pytest.mark.parametrize("argv", [a for a, _ in READERS if a[0] not in ("bundle", "replay")],
                         ids=[i for i in IDS if not i.startswith(("bundle", "replay"))])
def test_closed_and_full_stdout_are_one_line_errors(image, tmp_path, argv):
    cmd = " ".join(f"'{a}'" for a in _argv(argv, image, tmp_path))
    for redirect, words in ((">&-", "standard output is closed"), (">/dev/full", "No space left on device")):
        r = sh(f"qdebug {cmd} {redirect}")
        assert r.returncode == 1 or (argv[0] == "salvage" and r.returncode == 2), (redirect, r.stderr)
        line = one_error_line(r.stderr)
        assert words in line, (redirect, r.stderr)


def test_closed_stdout_never_becomes_an_image_descriptor(image, tmp_path):
    """With fd 1 closed, the image would get descriptor 1 and a print would write into it."""
    path = str(tmp_path / "w.qcow2")
    shutil.copy(image, path)
    trace = tmp_path / "one.trace"
    trace.write_text("write -P 9 0 4k\n")
    r = sh(f"qdebug replay '{path}' '{trace}' >&-")
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["qemu-img", "check", path], capture_output=True).returncode == 0
    assert qemu_io(path, "read -P 9 0 4k").returncode == 0


# ---- read-only filesystem -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def read_only_image(image, tmp_path_factory):
    """The image on a tmpfs mounted read-only (needs root, as CI runs)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: this test must run")
        pytest.skip("mounting a read-only filesystem needs root")
    mnt = tmp_path_factory.mktemp("rofs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs")
        pytest.skip("cannot mount a tmpfs here")
    shutil.copy(image, mnt / "k.qcow2")
    (mnt / "t.trace").write_text("write -P 7 0 4k\ndiscard 64k 64k\n")
    os.chmod(mnt / "k.qcow2", 0o444)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    yield str(mnt / "k.qcow2")
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("argv", [a for a, _ in READERS if a[0] != "bundle"],
                         ids=[i for i in IDS if not i.startswith("bundle")])
def test_readers_work_on_a_read_only_filesystem(read_only_image, tmp_path, argv):
    r = qd(*[a.format(img=read_only_image, trace=os.path.join(os.path.dirname(read_only_image), "t.trace"))
             for a in argv])
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr


def test_a_write_on_a_read_only_filesystem_is_one_line(read_only_image, tmp_path):
    trace = tmp_path / "one.trace"
    trace.write_text("write -P 9 0 4k\n")
    r = qd("replay", read_only_image, trace)
    assert r.returncode == 1 and read_only_image in one_error_line(r.stderr)


def test_quiet_drops_warnings_and_keeps_errors(held, tmp_path):
    r = qd("info", "-U", "-q", held)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("image: ")
    r = qd("map", "-q", held)  # the lock refusal is an error: -q does not hide it
    assert r.returncode == 1 and LOCK_MESSAGE in one_error_line(r.stderr)


def test_every_command_takes_q_and_every_image_command_takes_f():
    from qdebug.cli.main import build_parser

    for name, sp in build_parser()._subparsers._group_actions[0].choices.items():
        opts = sp._option_string_actions
        assert "-q" in opts, name
        if any(a.dest == "image" for a in sp._positionals._group_actions):
            assert "-f" in opts, name


def test_a_utf8_bom_starting_a_trace_is_accepted(image, tmp_path):
    path = str(tmp_path / "b.qcow2")
    shutil.copy(image, path)
    trace = tmp_path / "bom.trace"
    trace.write_bytes(b"\xef\xbb\xbfwrite -P 0x5a 0 4k\nwrite -P 0x5b 4k 4k\n")
    r = qd("replay", path, trace)
    assert r.returncode == 0, r.stderr
    assert qemu_io(path, "read -P 0x5a 0 4k", "read -P 0x5b 4k 4k").returncode == 0
    r = qd("replay", path, "-", stdin=None, input="\ufeffwrite -P 0x5c 8k 4k\n")
    assert r.returncode == 0, r.stderr
    assert qemu_io(path, "read -P 0x5c 8k 4k").returncode == 0
    assert qd("plan", path, "\ufeffwrite -P 1 0 4k").returncode == 0


def test_the_tui_refuses_without_a_terminal_and_leaves_nothing_behind(image, tmp_path):
    import glob
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "qdebug-demo-*")))
    for script in (f"qdebug '{image}' </dev/null", f"qdebug tui '{image}' | cat", "qdebug demo | cat",
                   "qdebug demo </dev/null"):
        r = sh(script)
        assert r.returncode == 1, (script, r.stderr)
        line = one_error_line(r.stderr)
        assert "not a terminal" in line and "\x1b" not in r.stderr + r.stdout, script
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "qdebug-demo-*"))) <= before


def test_dash_means_standard_output_for_read(image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([*QDEBUG, "read", image, "0", "4k", "-o", "-"], capture_output=True)
    assert r.returncode == 0 and r.stdout == bytes([1]) * 4096, r.stderr
    assert not os.path.exists(tmp_path / "-")
