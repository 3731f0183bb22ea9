"""Every panel follows the theme (#15 item 2): the rows the views draw reach a WCAG contrast of 4.5
on their own background in light and dark themes (main drew near-white on light grey: 1.4), and
SVG snapshots of a step in a light and a dark theme."""

from __future__ import annotations

import pytest

from qdebug.tui.app import make_app
from qdebug.tui.theme import MIN_CONTRAST, contrast
from tests.tui.conftest import settle
from tests.tui.test_snapshots import driver
from textual.color import Color


def worst_contrast(widget) -> tuple[float, str]:
    """The lowest fg/bg contrast of any visible character the widget draws, and that text."""
    worst = (99.0, "")
    for y in range(widget.size.height):
        for seg in widget.render_line(y):
            st = seg.style
            if not seg.text.strip() or st is None or st.color is None:
                continue
            assert st.bgcolor is not None, f"{widget}: {seg.text!r} has no background"
            fg, bg = (Color.from_rich_color(c) for c in (st.color, st.bgcolor))
            if st.reverse:
                fg, bg = bg, fg
            worst = min(worst, (contrast(fg, bg), seg.text))
    return worst


@pytest.mark.parametrize("theme", ["textual-light", "solarized-light", "textual-dark", "nord"])
async def test_every_view_is_readable_in_the_theme(demo, theme):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        app.theme = theme
        for key in ("n", "n", "i", "c"):  # a step's COW, the invalid cluster's hex, the findings
            await pilot.press(key)
            await settle(app, pilot)
        views = ["ClusterMap", "Timeline", "#hex", "FindingsView"]
        results = {sel: worst_contrast(app.query_one(sel)) for sel in views}
        await pilot.press("h")  # the host view
        await settle(app, pilot)
        results["HostView"] = worst_contrast(app.query_one("HostView"))
    low = {sel: r for sel, r in results.items() if r[0] < MIN_CONTRAST}
    assert not low, f"{theme}: {low}"


def test_theme_variables_follow_the_theme():
    """Derived from the theme, not literals: a light and a dark theme get different colours, each
    legible on its own background."""
    from textual.app import App

    from qdebug.tui.theme import qdebug_variables

    got = {}
    for name in ("textual-light", "textual-dark"):
        app = App()
        app.theme = name
        variables = App.get_css_variables(app)
        got[name] = qdebug_variables(variables)
        bg = Color.parse(variables["background"])
        for key, value in got[name].items():
            if key not in ("qd-cursor", "qd-on-error"):  # (a background, and the text on $error)
                assert contrast(Color.parse(value), bg) >= MIN_CONTRAST, (name, key, value)
        on_error = contrast(Color.parse(got[name]["qd-on-error"]), Color.parse(variables["error"]))
        assert on_error >= 3.5, (name, on_error)
    assert got["textual-light"]["qd-data"] != got["textual-dark"]["qd-data"]


def themed(theme: str, *keys: str):
    run = driver(*keys)

    async def run_before(pilot) -> None:
        pilot.app.theme = theme
        await run(pilot)
    return run_before


@pytest.mark.parametrize("theme", ["textual-light", "textual-dark"])
def test_step_snapshot_in_theme(snap_compare, demo, theme, monkeypatch):
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")
    app = make_app(demo["image"], trace=demo["trace"])
    assert snap_compare(app, terminal_size=(120, 40), run_before=themed(theme, "n", "n"))
