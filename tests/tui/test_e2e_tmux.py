"""End to end: `qdebug demo` in a real terminal (tmux): open, step, repair, quit (discarding)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None and os.environ.get("CI") != "true", reason="tmux not installed")


def tmux(*args: str) -> str:
    return subprocess.run([TMUX, *args], check=True, capture_output=True, text=True).stdout


def wait_for(session: str, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-t", session, "-p")
        if text in screen:
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear on the screen:\n{screen}")


def test_demo_in_tmux_steps_repairs_and_quits(tmp_path):
    session = f"qdebug-e2e-{os.getpid()}"
    status = tmp_path / "exit"
    # pytest exports COLUMNS/LINES; the app must see the tmux window's size instead
    cmd = (f"env -u COLUMNS -u LINES {shlex.quote(sys.executable)} -m qdebug.cli demo; "
           f"echo $? > {shlex.quote(str(status))}; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-e", "COLORTERM=truecolor",
         "-e", "TEXTUAL_ANIMATIONS=none", cmd)
    subprocess.run([TMUX, "resize-window", "-t", session, "-x", "120", "-y", "40"], capture_output=True)
    try:
        wait_for(session, "cluster map")
        wait_for(session, "not applied yet")
        tmux("send-keys", "-t", session, "n")
        wait_for(session, "step 1 of 9 (applied)")
        tmux("send-keys", "-t", session, "n")
        screen = wait_for(session, "step 2 of 9 (applied)")
        assert "cow_start" in screen and "cow_end" in screen
        tmux("send-keys", "-t", session, "i")
        wait_for(session, "L2 entry of cluster 48")
        assert "!!!!!!!!_!!!!!!!!" in tmux("capture-pane", "-t", session, "-p")
        tmux("send-keys", "-t", session, "r")
        wait_for(session, "keep the data: clear the zero bit of subclusters 7")
        tmux("send-keys", "-t", session, "Enter")
        screen = wait_for(session, "0-31 NORMAL")
        assert "!!!!!!!!" not in screen
        assert "3 unsaved changes" in tmux("capture-pane", "-t", session, "-p")  # the header says so
        tmux("send-keys", "-t", session, "q")  # two steps and a repair in the scratch copy: q asks
        wait_for(session, "save them as a new image")
        assert not status.exists()
        tmux("send-keys", "-t", session, "d")
        deadline = time.monotonic() + 15
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True)


def test_sigterm_ends_the_app_and_removes_the_scratch_copy(tmp_path):
    """SIGTERM (or SIGHUP: the terminal closed) while steps sit in a scratch copy: the app ends
    through its event loop (exit status 128 + 15, the terminal restored) and the copy is removed."""
    import signal

    from qdebug.demo import build_demo

    paths = build_demo(str(tmp_path / "demo"))
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    session = f"qdebug-term-{os.getpid()}"
    status, pidfile = tmp_path / "exit", tmp_path / "pid"
    app = (f"env -u COLUMNS -u LINES TMPDIR={shlex.quote(str(scratch_root))} "
           f"{shlex.quote(sys.executable)} -m qdebug.cli tui {shlex.quote(paths['image'])} "
           f"--trace {shlex.quote(paths['trace'])}")
    cmd = (f"sh -c {shlex.quote(f'echo $$ > {shlex.quote(str(pidfile))}; exec {app}')}; "
           f"echo $? > {shlex.quote(str(status))}; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-e", "TEXTUAL_ANIMATIONS=none", cmd)
    try:
        wait_for(session, "not applied yet")
        tmux("send-keys", "-t", session, "n")
        wait_for(session, "1 unsaved change")
        assert any(scratch_root.iterdir())  # the scratch copy exists
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        deadline = time.monotonic() + 15
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status.read_text().strip() == str(128 + signal.SIGTERM)
        assert not any(scratch_root.iterdir())  # removed
        assert "Traceback" not in tmux("capture-pane", "-t", session, "-p")
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True)
