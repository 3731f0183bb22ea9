"""The host view (#13): one row per host cluster, kind and owners from the engine's layout, overlaps
and leaks found, the guest clusters a host cluster holds; in the app `h` toggles it with the guest
view and Enter jumps between a host cluster and its owners."""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult

from qdebug.engine.forensics.layout import host_layout
from qdebug.tui.host_view import HostView
from qdebug.tui.app import make_app
from qdebug.tui.cluster_map import ClusterMap
from tests.qemu import create, qemu_io
from tests.tui.conftest import settle
from tests.tui.test_snapshots import driver


def _image(tmp_path) -> str:
    path = create(str(tmp_path / "o.qcow2"), "4M")
    qemu_io(path, "write -q -P 0x11 0 128k")
    with open(path, "r+b") as f:  # guest cluster 1 -> the L2 table's own cluster: an overlap, cluster 6 leaked
        f.seek(0x40000 + 16)
        f.write((0x8000000000040000).to_bytes(8, "big"))
    return path


class _Host(App):
    def __init__(self, layout):
        super().__init__()
        self.lay = layout

    def compose(self) -> ComposeResult:
        yield HostView(self.lay, id="host")


async def test_host_view_rows_and_problems(qemu, tmp_path):
    lay = host_layout(_image(tmp_path))
    app = _Host(lay)
    async with app.run_test(size=(120, 20)) as pilot:
        view = app.query_one(HostView)
        assert view.row_count == lay.nb_clusters == 7
        text = [view.render_row(i, False).text for i in range(view.row_count)]
        assert "header" in text[0] and "l1" in text[3]
        assert "overlap" in text[4] and "L2 table of L1 index 0 and data of guest 0x10000" in text[4]
        assert "data" in text[5] and "data of guest 0x0" in text[5]
        assert "leaked" in text[6] and "looks like data" in text[6]
        assert view.next_problem(0) == 4 and view.next_problem(4) == 6 and view.next_problem(6) is None
        assert view.guest_clusters(4) == [1] and view.guest_clusters(5) == [0] and view.guest_clusters(0) == []
        view.focus()
        await pilot.press("down", "down")
        assert view.cursor == 2


async def test_h_toggles_the_host_view_and_enter_jumps_to_owners_and_back(qemu, tmp_path):
    image = _image(tmp_path)
    lay = host_layout(image)
    app = make_app(image, counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        host, cmap = app.query_one(HostView), app.query_one(ClusterMap)
        await pilot.press("h")
        await settle(app, pilot)
        assert host.display and not cmap.display and app.focused is host
        assert host.row_count == lay.nb_clusters
        assert [host.host_layout.kind_of(i) for i in range(7)] == [lay.kind_of(i) for i in range(7)]
        assert "problems: " in str(host.border_subtitle)
        await pilot.press("i")  # the next problem
        await settle(app, pilot)
        assert host.cursor == 4 and "overlap" in str(app.query_one("#entry").render())
        await pilot.press("enter")  # to its owner in the guest view
        await settle(app, pilot)
        assert cmap.display and not host.display and cmap.cursor == 1
        await pilot.press("enter")  # and back to the host cluster holding it
        await settle(app, pilot)
        assert host.display and host.cursor == 4
        await pilot.press("i")
        await settle(app, pilot)
        assert host.cursor == 6 and "leaked" in str(app.query_one("#entry").render())
        await pilot.press("enter")  # a leaked cluster has no owner: says so, stays
        await settle(app, pilot)
        assert host.display and host.cursor == 6
        await pilot.press("h")
        await settle(app, pilot)
        assert cmap.display and not host.display and app.focused is cmap


@pytest.fixture
def overlap_image(tmp_path, qemu):
    return _image(tmp_path)


def test_host_view_snapshot(snap_compare, overlap_image, monkeypatch):
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")
    app = make_app(overlap_image, counts=False)
    assert snap_compare(app, terminal_size=(120, 30), run_before=driver("h", "i"))
