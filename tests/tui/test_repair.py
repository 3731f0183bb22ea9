"""The repair flow: modal, policy, apply through the journal, one-key undo, views refreshed."""

from __future__ import annotations

import hashlib
import struct

from qdebug.demo import INVALID_CLUSTER, INVALID_SUBCLUSTER
from qdebug.engine.format.subclusters import SubclusterType as T
from qdebug.tui.app import make_app
from qdebug.tui.cluster_map import ClusterMap
from qdebug.tui.messages import CheckFinished, RepairApplied
from qdebug.tui.repair_screen import RepairScreen
from tests.tui.conftest import settle


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def l2_patch(plan) -> tuple[int, int]:
    (patch,) = [p for item in plan.items for p in item.patches if p.what == "L2"]
    return struct.unpack(">QQ", patch.data)


async def open_repair(app, pilot) -> RepairScreen:
    await pilot.press("i")
    await settle(app, pilot)
    assert app.query_one(ClusterMap).cursor == INVALID_CLUSTER
    await pilot.press("r")
    await settle(app, pilot)
    screen = app.screen
    assert isinstance(screen, RepairScreen)
    return screen


async def test_repair_changes_the_bitmap_as_the_engine_says_and_undo_restores(demo):
    original = digest(demo["image"])
    seen = []
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40), message_hook=seen.append) as pilot:
        before = app.model.entry(INVALID_CLUSTER)
        assert before.invalid
        screen = await open_repair(app, pilot)
        plan = screen.plan
        assert [it.finding.kind for it in plan.items] == ["invalid-bitmap-allocated"]
        assert screen.selected_entries == [(0, INVALID_CLUSTER)]
        w0, bitmap = l2_patch(plan)
        assert bitmap == before.bitmap & ~(1 << (32 + INVALID_SUBCLUSTER))  # keep-data: the zero bit goes
        scratch = app.bench.replay.path
        pre = digest(scratch)
        await pilot.press("enter")
        await settle(app, pilot)
        assert [m.undone for m in seen if isinstance(m, RepairApplied)] == [False]
        after = app.model.entry(INVALID_CLUSTER)
        assert (after.word0, after.bitmap) == (w0, bitmap)
        assert not after.invalid and set(after.types) == {T.NORMAL}
        assert "!" not in app.query_one(ClusterMap).render_row(INVALID_CLUSTER, False).text
        reports = [m.report for m in seen if isinstance(m, CheckFinished)]
        assert reports[-1].corruptions == 0  # re-checked after the repair
        await pilot.press("u")
        await settle(app, pilot)
        assert digest(scratch) == pre
        assert app.model.entry(INVALID_CLUSTER).bitmap == before.bitmap
        assert [m.undone for m in seen if isinstance(m, RepairApplied)] == [False, True]
    assert digest(demo["image"]) == original


async def test_policy_choice_replans(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_repair(app, pilot)
        keep = l2_patch(screen.plan)[1]
        await pilot.click("#policy-zero")
        await pilot.pause()
        assert screen.policy == "zero"
        zero = l2_patch(screen.plan)[1]
        assert zero == keep ^ (1 << INVALID_SUBCLUSTER) ^ (1 << (32 + INVALID_SUBCLUSTER))  # alloc bit goes instead
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, RepairScreen)
        assert app.model.entry(INVALID_CLUSTER).invalid  # cancelled: nothing written


async def test_steps_and_repairs_share_one_undo_stack(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("n")
        await settle(app, pilot)
        await open_repair(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        assert [type(a).__name__ for a in app.bench.actions] == ["StepAction", "RepairAction"]
        await pilot.press("p")  # undoes the newest change: the repair
        await settle(app, pilot)
        assert [type(a).__name__ for a in app.bench.actions] == ["StepAction"] and app.model.entry(INVALID_CLUSTER).invalid
        await pilot.press("p")
        await settle(app, pilot)
        assert app.bench.position == 0 and not app.bench.actions


async def test_check_in_a_child_process_reports_what_the_engine_does(demo):
    """Large images are checked in a spawned child (no GIL shared with the UI); same report."""
    from qdebug.engine.check.checker import check_image
    from qdebug.engine.file.image import open_image

    seen = []
    app = make_app(demo["image"], counts=False)
    app.check_in_child = True
    async with app.run_test(size=(120, 40), message_hook=seen.append) as pilot:
        await pilot.press("c")
        await settle(app, pilot)
        (report,) = [m.report for m in seen if isinstance(m, CheckFinished)]
        with open_image(demo["image"]) as img:
            expected = check_image(img)
        assert report.findings == expected.findings and report.counts() == expected.counts()
        assert report.references is None  # not sent back for display
        assert app.query_one(ClusterMap).cursor == INVALID_CLUSTER  # the first error is selected
