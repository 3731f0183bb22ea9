"""Unsaved work, the check tab's freshness, failed steps and trace lines that cannot be replayed
(#15 items 1, 3, 5 and 11's TUI part)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from qdebug.tui.app import make_app
from qdebug.tui.lists import Timeline
from qdebug.tui.screens import PathScreen, QuitScreen
from tests.qemu import qemu_io
from tests.tui.conftest import settle


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def press(app, pilot, *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await settle(app, pilot)


def status_text(app) -> str:
    return str(app.query_one("#status-text").render())


async def test_quit_without_changes_exits_at_once(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert "no unsaved changes" in app.sub_title
        assert app.return_code is None
        await press(app, pilot, "q")
        assert app.return_code == 0  # exited, no question asked


async def test_quit_asks_and_escape_stays_then_discard(demo):
    original = digest(demo["image"])
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "n")
        scratch = app.bench.replay.path
        assert "● 1 unsaved change in a scratch copy" in app.sub_title  # the header says so at all times
        await press(app, pilot, "ctrl+c")  # ctrl+c asks as q does
        assert isinstance(app.screen, QuitScreen)
        await press(app, pilot, "escape")
        assert not isinstance(app.screen, QuitScreen) and app.is_running
        await press(app, pilot, "p")  # every change undone: nothing to lose, q quits at once
        assert "no unsaved changes" in app.sub_title
        await press(app, pilot, "n", "q")
        assert isinstance(app.screen, QuitScreen)
        assert app.return_code is None
        await press(app, pilot, "d")
        assert app.return_code == 0
    assert not os.path.exists(scratch)  # discarded
    assert digest(demo["image"]) == original


async def test_quit_save_writes_what_qemu_io_makes(demo, tmp_path, qemu):
    """`s` saves the scratch copy as a new image (default IMAGE.repaired.qcow2): the same guest
    disk as qemu-io running the same two steps on a copy of the image."""
    original = digest(demo["image"])
    reference = os.path.join(os.path.dirname(demo["image"]), "reference.qcow2")  # beside its backing file
    shutil.copy(demo["image"], reference)
    qemu_io(reference, "write -P 0x5a 5k 3k", "write -P 0x61 61k 6k")
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "n", "n", "q", "s")
        screen = app.screen
        assert isinstance(screen, PathScreen)
        default = os.path.splitext(demo["image"])[0] + ".repaired.qcow2"
        assert screen.query_one("#path-input").value == default
        await press(app, pilot, "enter")
    assert app.return_code == 0
    assert os.path.exists(default) and digest(demo["image"]) == original
    assert digest(default) == digest(reference)  # byte for byte the file qemu-io makes


async def test_save_as_never_overwrites_and_keeps_the_text(demo, tmp_path):
    here = Path(demo["image"]).parent  # the demo's backing file name is relative: copies stay beside it
    taken = here / "taken.qcow2"
    taken.write_bytes(b"mine")
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        app.action_save_as()  # nothing done yet: nothing to save
        await settle(app, pilot)
        assert not isinstance(app.screen, PathScreen)
        await press(app, pilot, "n")
        await app.run_action("save_as")  # what ctrl+s and the palette's "Save as…" run
        await settle(app, pilot)
        field = app.screen.query_one("#path-input")
        field.value = str(taken)
        await press(app, pilot, "enter")
        assert isinstance(app.screen, PathScreen)  # refused, the prompt stays with the text
        assert field.value == str(taken) and "exists" in str(app.screen.query_one("#path-error").render())
        field.value = str(tmp_path / "elsewhere.qcow2")
        await press(app, pilot, "enter")
        assert "relative to the image's directory" in str(app.screen.query_one("#path-error").render())
        field.value = str(here / "new.qcow2")
        await press(app, pilot, "enter")
        assert not isinstance(app.screen, PathScreen)
        assert "saved as new.qcow2" in app.sub_title
        assert taken.read_bytes() == b"mine"
        assert digest(str(here / "new.qcow2")) == digest(app.bench.replay.path)
        await press(app, pilot, "q")  # saved: nothing unsaved, no question
    assert app.return_code == 0


def test_palette_offers_save_as(demo):
    from qdebug.tui.palette import QDebugCommands

    app = make_app(demo["image"], counts=False)
    names = [name for name, _, _ in QDebugCommands.commands(type("P", (), {"app": app})())]
    assert "Save as…" in names and "Host view / guest view" in names and "Snapshot map…" in names


async def test_check_tab_goes_stale_after_any_change(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        tab = app.query_one("TabbedContent").get_tab("tab-check")
        assert str(tab.label) == "check"
        await press(app, pilot, "c")
        assert str(tab.label) == "check (1)"
        await press(app, pilot, "i", "r", "enter")  # repaired: checked again in the background
        assert str(tab.label) == "check (0)"
        assert "No errors were found on the image." in str(app.query_one("#check-status").render())
        await press(app, pilot, "p")  # the repair undone: the check no longer describes the image
        assert str(tab.label) == "check (0, stale)"
        assert "stale" in str(app.query_one("#check-status").render())
        await press(app, pilot, "c")
        assert str(tab.label) == "check (1)"
        await press(app, pilot, "n")  # a step changes the image too
        assert "stale" in str(tab.label)


async def test_a_failed_step_is_marked_with_its_reason(demo, tmp_path):
    trace = tmp_path / "t.trace"
    trace.write_text("write -P 0x11 0 4k\nread -P 0x22 0 4k\nread -P 0x11 0 4k\n")
    app = make_app(demo["image"], trace=str(trace), counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "n", "n", "n")
        timeline = app.query_one(Timeline)
        rows = [timeline.render_row(i, False).text for i in range(3)]
        assert rows[0].startswith("✓") and rows[1].startswith("✗") and rows[2].startswith("▶")
        timeline.move_to(1)
        await settle(app, pilot)
        assert status_text(app) == "step 2 failed: Pattern verification failed at offset 0, 4096 bytes"


async def test_a_trace_with_a_line_that_cannot_run_opens_and_marks_it(demo, tmp_path):
    trace = tmp_path / "t.trace"
    trace.write_text("write -P 0x11 0 4k\nwrite oops\nwrite -P 0x22 64k 4k\n")
    app = make_app(demo["image"], trace=str(trace), counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        timeline = app.query_one(Timeline)
        assert timeline.row_count == 3 and timeline.steps == 1
        rows = [timeline.render_row(i, False).text for i in range(3)]
        assert rows[1].startswith("✗") and "write oops" in rows[1] and rows[2].startswith("    -")
        assert "line 2 cannot be replayed" in status_text(app)
        await press(app, pilot, "n", "n")  # the session stops before line 2
        assert app.bench.position == 1
        assert "1 not run" not in timeline.border_subtitle and "2 not run" in timeline.border_subtitle
