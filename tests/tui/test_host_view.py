"""The host view widget (not yet in the app): one row per host cluster, kind and owners from the
engine's layout, overlaps and leaks found, the guest clusters a host cluster holds."""

from __future__ import annotations

from textual.app import App, ComposeResult

from qdebug.engine.forensics.layout import host_layout
from qdebug.tui.host_view import HostView
from tests.qemu import create, qemu_io


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
