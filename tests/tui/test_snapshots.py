"""SVG snapshots of the main states on the demo, at 120x40 and 80x24 (review them, then
`pytest --snapshot-update`). Animations are off so progress bars and cursors are stable."""

from __future__ import annotations

import pytest

from qdebug.tui.app import make_app
from tests.tui.conftest import settle

SIZES = [(120, 40), (80, 24)]


@pytest.fixture(autouse=True)
def no_animations(monkeypatch):
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")


def driver(*keys: str):
    async def run_before(pilot) -> None:
        app = pilot.app
        app.animation_level = "none"
        await settle(app, pilot)
        for key in keys:
            await pilot.press(key)
            await settle(app, pilot)
        await settle(app, pilot)
    return run_before


def demo_app(demo):
    return make_app(demo["image"], trace=demo["trace"])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_main_screen(snap_compare, demo, size):
    assert snap_compare(demo_app(demo), terminal_size=size, run_before=driver())


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_step_with_cow_plan_across_two_clusters(snap_compare, demo, size):
    assert snap_compare(demo_app(demo), terminal_size=size, run_before=driver("n", "n"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_repair_modal(snap_compare, demo, size):
    assert snap_compare(demo_app(demo), terminal_size=size, run_before=driver("i", "r"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help_screen(snap_compare, demo, size):
    assert snap_compare(demo_app(demo), terminal_size=size, run_before=driver("question_mark"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quit_prompt(snap_compare, demo, size):
    assert snap_compare(demo_app(demo), terminal_size=size, run_before=driver("n", "n", "q"))
