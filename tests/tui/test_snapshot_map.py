"""Internal snapshots in the TUI (#15 item 8): listed in the image panel, `S` opens one's L1 as a
read-only map, clusters shared with a snapshot (no COPIED) are marked."""

from __future__ import annotations

import pytest

from qdebug.tui.app import make_app
from qdebug.tui.cluster_map import ClusterMap
from qdebug.tui.screens import SnapshotScreen
from tests.qemu import create, qemu_img, qemu_io
from tests.tui.conftest import settle
from tests.tui.test_snapshots import driver


@pytest.fixture
def snapped(tmp_path, qemu):
    path = create(str(tmp_path / "s.qcow2"), "1M")
    qemu_io(path, "write -P 0x11 0 256k")
    qemu_img("snapshot", "-c", "before", path)
    qemu_io(path, "write -P 0x22 64k 64k")  # cluster 1 copied away from the snapshot; 0, 2, 3 shared
    return path


async def press(app, pilot, *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await settle(app, pilot)


async def test_S_opens_a_snapshot_map_read_only(snapped):
    app = make_app(snapped, counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert "snapshots (1) 1 'before'" in str(app.query_one("#header-panel").render())
        cmap = app.query_one(ClusterMap)
        rows = [cmap.render_row(i, False).text for i in range(4)]
        assert [r.startswith("s ") for r in rows] == [True, False, True, True]  # shared: no COPIED
        await press(app, pilot, "S")
        assert isinstance(app.screen, SnapshotScreen)
        await press(app, pilot, "down", "enter")
        assert app.snap_model is not None and "snapshot 1 'before' (read-only)" in str(cmap.border_title)
        cmap.select(1)
        await settle(app, pilot)
        assert app.snap_model.subcluster_bytes(1, 0).data[:16] == b"\x11" * 16  # the snapshot's data
        assert app.model.subcluster_bytes(1, 0).data[:16] == b"\x22" * 16  # the active image's
        assert "11 11 11" in app.query_one("#hex").render_row(0, False).text
        await press(app, pilot, "r")  # no repair through a snapshot's map
        assert not app.bench.actions
        await press(app, pilot, "S", "up", "enter")  # (the open snapshot is highlighted) the active image again
        assert app.snap_model is None and str(cmap.border_title) == "cluster map"


async def test_S_without_snapshots_says_so(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await press(app, pilot, "S")
        assert not isinstance(app.screen, SnapshotScreen)
        assert any("has no internal snapshots" in n.message for n in app._notifications)


@pytest.fixture
def snapped_app(snapped):
    return make_app(snapped)


def test_snapshot_map_snapshot(snap_compare, snapped_app, monkeypatch):
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")
    assert snap_compare(snapped_app, terminal_size=(120, 40), run_before=driver("S", "down", "enter"))
