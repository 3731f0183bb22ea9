"""What a new user tripped over (#15 items 4, 6, 7, 9): cut numbers, hidden keys, 80x24, the hex
view's unreadable bytes, and the prompts."""

from __future__ import annotations

import os

from textual.widgets import TabbedContent
from textual.widgets._footer import FooterKey

from qdebug.demo import INVALID_CLUSTER, INVALID_SUBCLUSTER
from qdebug.tui.app import make_app
from qdebug.tui.cluster_map import ClusterMap
from qdebug.tui.hex_view import HexView
from qdebug.tui.lists import FindingsView, Timeline
from qdebug.tui.repair_screen import RepairScreen
from qdebug.tui.screens import GotoScreen, HelpScreen, PathScreen, complete_path
from tests.tui.conftest import settle


async def press(app, pilot, *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await settle(app, pilot)


def shown(view, index: int) -> str:
    """Row `index` as the view draws it now (scrolled, cut at the view's edge)."""
    return view.render_line(index - view.scroll_offset.y).text


# ---- item 4: a number is never cut silently ----------------------------------------------------
async def test_long_trace_lines_end_in_an_ellipsis_and_the_column_widens(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        timeline = app.query_one(Timeline)
        for i, t in enumerate(timeline.lines[:6]):
            text = shown(timeline, i).rstrip()
            assert t.text in text or text.endswith("…"), text  # (main: '… 0x400000 6' for '64k')
        assert not all(t.text in shown(timeline, i) for i, t in enumerate(timeline.lines[:6]))
        width = timeline.outer_size.width
        await press(app, pilot, *[">"] * 4)
        assert timeline.outer_size.width == width + 16
        assert all(t.text in shown(timeline, i) for i, t in enumerate(timeline.lines[:6]))
        await press(app, pilot, "<")
        assert timeline.outer_size.width == width + 12


async def test_the_check_pane_never_cuts_an_offset(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "c")
        findings = app.query_one(FindingsView)
        place = findings.findings[0].place()
        assert "guest 0x300000" in place
        line = shown(findings, 0).rstrip()
        assert place in line or line.endswith("…")  # (main: 'guest 0x3000' for 0x300000)
        findings.focus()
        for _ in range(12):
            if place in shown(findings, 0):
                break
            await press(app, pilot, "right")  # scrolls sideways
        assert "guest 0x300000" in shown(findings, 0)


# ---- item 6: keys for the plan and the check, a new step brings the plan forward ---------------
async def test_plan_and_check_keys_and_a_step_brings_the_plan(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        tabs = app.query_one(TabbedContent)
        await press(app, pilot, "C")
        assert tabs.active == "tab-check"
        await press(app, pilot, "P")
        assert tabs.active == "tab-plan"
        await press(app, pilot, "C", "n")
        assert tabs.active == "tab-plan"
        rows = {bid: (keys, desc) for keys, desc, bid in app.help_rows()}
        assert rows["view.plan"][0] == "P" and rows["view.check"][0] == "C"
        assert rows["view.host"][0] == "h" and rows["layout.wider"][0] == ">"


async def test_repair_dialog_arrows_move_between_policies_with_their_effect(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "i", "r")
        screen = app.screen
        assert isinstance(screen, RepairScreen)
        help_text = str(screen.query_one("#repair-policy-help").render())
        for policy in ("keep-data", "zero", "unallocate"):
            assert f"{policy}: " in help_text  # every policy, with its effect in words
        assert screen.policy.value == "keep-data"
        await press(app, pilot, "down")
        assert screen.policy.value == "zero" and screen.plan.policy.value == "zero"  # planned again
        assert "clear" in str(screen.query_one("#repair-plan").render())
        await press(app, pilot, "down", "down")
        assert screen.policy.value == "keep-data"  # wraps around
        await press(app, pilot, "up")
        assert screen.policy.value == "unallocate"


# ---- item 7: 80x24 ------------------------------------------------------------------------------
async def test_footer_keeps_help_and_quit_at_80_columns(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        keys = list(app.screen.query(FooterKey))
        actions = {k.action for k in keys}
        assert {"help", "quit"} <= actions  # (main: both were pushed off the right edge)
        assert all(k.region.right <= 80 for k in keys)
        await pilot.resize_terminal(60, 24)
        await settle(app, pilot)
        keys = list(app.screen.query(FooterKey))
        assert {"help", "quit"} <= {k.action for k in keys} and all(k.region.right <= 60 for k in keys)


async def test_selection_stays_visible_after_a_resize(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        cmap = app.query_one(ClusterMap)
        cmap.select(30)
        await settle(app, pilot)
        await pilot.resize_terminal(80, 24)
        await settle(app, pilot)
        top = cmap.scroll_offset.y
        assert top <= cmap.cursor < top + cmap.scrollable_content_region.height
        await pilot.resize_terminal(120, 40)
        await settle(app, pilot)
        top = cmap.scroll_offset.y
        assert top <= cmap.cursor < top + cmap.scrollable_content_region.height


async def test_help_scrolls_with_a_hint_at_80x24(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "question_mark")
        screen = app.screen
        assert isinstance(screen, HelpScreen)
        box, scroll = screen.query_one("#help-box"), screen.query_one("#help-scroll")
        assert box.region.right <= 80 and box.region.bottom <= 24
        assert scroll.max_scroll_y > 0 and "scroll" in str(box.border_subtitle)
        await press(app, pilot, "pagedown")
        assert scroll.scroll_y > 0


# ---- item 9: unreadable bytes, the prompts ------------------------------------------------------
async def test_unreadable_bytes_are_marked_alike_in_hex_and_ascii(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        app.query_one(ClusterMap).select(INVALID_CLUSTER, INVALID_SUBCLUSTER)
        await settle(app, pilot)
        hexv = app.query_one(HexView)
        rows = [hexv.render_row(i, False).text for i in range(min(hexv.row_count, 8))]
        assert rows and all("??" in r for r in rows)
        for r in rows:
            ascii_part = r.rstrip()[-hexv.per_row:]
            assert ascii_part == "?" * hexv.per_row, r  # (main: '........' beside '?? ?? ...')


async def test_goto_keeps_the_text_after_an_error_and_lists_its_forms(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "g")
        screen = app.screen
        assert isinstance(screen, GotoScreen)
        forms = str(screen.query_one("#goto-forms").render())
        assert "step 3" in forms and "cluster 12" in forms and "0x120000" in forms
        field = screen.query_one("#goto-input")
        await press(app, pilot, "c", "l", "tab")  # keywords complete
        assert field.value == "cluster "
        await press(app, pilot, *"9999", "enter")
        assert app.screen is screen and field.value == "cluster 9999"
        assert "past the end of the image" in str(screen.query_one("#goto-error").render())
        field.value = "step 99"
        await press(app, pilot, "enter")
        assert app.screen is screen and "9 steps" in str(screen.query_one("#goto-error").render())
        field.value = "step 2"
        await press(app, pilot, "enter")
        assert app.screen is not screen and app.bench.position == 2


def test_paths_complete_as_a_shell_does(tmp_path):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "boot.trace").write_text("")
    (tmp_path / "traces" / "boot-2.trace").write_text("")
    (tmp_path / "other").write_text("")
    base = str(tmp_path) + os.sep
    assert complete_path(base + "tr") == base + "traces/"
    assert complete_path(base + "traces/bo") == base + "traces/boot"  # the part every match shares
    assert complete_path(base + "traces/boot-") == base + "traces/boot-2.trace"
    assert complete_path(base + "nothing") is None


async def test_open_trace_completes_and_keeps_the_text_after_an_error(demo, tmp_path):
    bad = tmp_path / "unreadable.trace"
    bad.write_bytes(b"\xff\xfe write")
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "o")
        screen = app.screen
        assert isinstance(screen, PathScreen)
        field = screen.query_one("#path-input")
        field.value = str(tmp_path / "unre")
        field.cursor_position = len(field.value)
        await settle(app, pilot)
        await press(app, pilot, "tab")
        assert field.value == str(bad)
        await press(app, pilot, "enter")
        assert app.screen is screen and field.value == str(bad)
        assert "not a text file" in str(screen.query_one("#path-error").render())
        field.value = demo["trace"]
        await press(app, pilot, "enter")
        assert app.screen is not screen and len(app.bench.commands) == 9
