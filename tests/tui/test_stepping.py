"""Stepping a trace in the app: the image bytes, the plan shown, the timeline and the mouse."""

from __future__ import annotations

import hashlib

from qdebug.engine.file.chain import open_chain
from qdebug.engine.read.guest import read_guest
from qdebug.engine.write.writer import WriteEngine
from qdebug.trace.commands import parse_trace
from qdebug.tui.app import make_app
from qdebug.tui.cluster_map import ClusterMap
from qdebug.tui.lists import Timeline
from qdebug.tui.messages import StepChanged
from tests.tui.conftest import settle


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def positions(seen) -> list[int]:
    """Positions of the StepChanged messages, without the one that announces the session opening."""
    moves = [m for m in seen if isinstance(m, StepChanged)]
    if moves and moves[0].position == 0 and moves[0].changes is None and moves[0].record is None:
        moves = moves[1:]
    return [m.position for m in moves]


def plan_text(app) -> str:
    return str(app.query_one("#plan").render())


async def test_step_forward_then_back_restores_the_bytes(demo):
    original = digest(demo["image"])
    seen = []
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40), message_hook=seen.append) as pilot:
        await pilot.press("n")
        await settle(app, pilot)
        scratch = app.bench.replay.path
        assert scratch != demo["image"]
        after_one = digest(scratch)
        guest_one = read_guest(app.chain, 0, 1 << 20)
        assert guest_one[5 * 1024:8 * 1024] == b"\x5a" * 3072
        await pilot.press("n")
        await settle(app, pilot)
        assert digest(scratch) != after_one
        await pilot.press("p")
        await settle(app, pilot)
        assert digest(scratch) == after_one and read_guest(app.chain, 0, 1 << 20) == guest_one
        await pilot.press("left_square_bracket")
        await settle(app, pilot)
        assert digest(scratch) == original  # every step undone: the scratch copy is the image again
        assert positions(seen) == [1, 2, 1, 0]
        assert app.query_one(Timeline).position == 0
    assert digest(demo["image"]) == original  # read-only: the user's image was never written


async def test_plan_panel_shows_the_engines_plan_across_two_clusters(demo):
    commands = parse_trace(open(demo["trace"]).read().splitlines(), demo["trace"])
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("n", "n")
        await settle(app, pilot)
        rec = app.bench.last_record
        plan = rec.plan
        assert rec.command == commands[1]
        text = plan_text(app)
        assert {c.guest_cluster for c in plan.clusters} == {0, 1}
        for c in plan.clusters:
            assert c.bitmap_before in text and c.bitmap_after in text
            assert f"cluster {c.guest_cluster} @0x{c.guest_cluster * 65536:x}" in text
        for r in plan.requests:
            assert f"guest 0x{r.guest_offset:x}+0x{r.length:x}" in text
            for m in r.metas:
                for s in m.sources:
                    assert f"COW 0x{s.guest_offset:x}+0x{s.length:x} from {s.label}" in text
        assert "cow_start" in text and "cow_end" in text
        assert app.query_one(ClusterMap).cursor == 0  # the map shows the first cluster of the plan


async def test_the_plan_matches_a_fresh_engine_run(demo, tmp_path):
    """What the panel shows for step 1 is what WriteEngine.plan says on the untouched demo image."""
    import shutil

    copy = str(tmp_path / "copy.qcow2")
    shutil.copyfile(demo["image"], copy)
    shutil.copyfile(demo["backing"], str(tmp_path / "base.qcow2"))
    commands = parse_trace(open(demo["trace"]).read().splitlines(), demo["trace"])
    with open_chain(copy, writable=True) as chain:
        expected = WriteEngine(chain).plan(commands[0])
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("n")
        await settle(app, pilot)
        shown = app.bench.last_record.plan
        assert shown.requests == expected.requests and shown.clusters == expected.clusters
        for c in expected.clusters:
            assert c.bitmap_after in plan_text(app)


async def test_mouse_on_timeline_and_map(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.click("#timeline", offset=(4, 3))  # the rule, then rows 0, 1, 2: step 3
        await settle(app, pilot)
        assert app.bench.position == 3
        assert app.query_one(Timeline).position == 3
        await pilot.click("#map", offset=(30, 1 + 5))  # row 5 of the map (after the rule)
        await pilot.pause()
        cmap = app.query_one(ClusterMap)
        assert cmap.cursor == cmap.scroll_offset.y + 5


async def test_goto_step_seeks_in_a_worker(demo):
    seen = []
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40), message_hook=seen.append) as pilot:
        app.goto(("step", 8))
        await settle(app, pilot)
        assert app.bench.position == 8
        assert app.model.entry(64).compressed  # step 8 wrote the compressed cluster
        app.goto(("step", 0))
        await settle(app, pilot)
        assert app.bench.position == 0 and not app.model.entry(64).compressed


async def test_write_mode_steps_the_image_itself_and_undo_restores_it(demo):
    original = digest(demo["image"])
    app = make_app(demo["image"], trace=demo["trace"], write=True, counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("n")
        await settle(app, pilot)
        assert app.bench.replay.path == demo["image"]
        assert digest(demo["image"]) != original
        await pilot.press("p")
        await settle(app, pilot)
        assert digest(demo["image"]) == original


async def test_resize_keys_change_the_step_area(demo):
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        bottom = app.query_one("#bottom")
        before = bottom.outer_size.height
        await pilot.press("plus", "plus")
        await pilot.pause()
        assert bottom.outer_size.height == before + 4
        await pilot.press("minus")
        await pilot.pause()
        assert bottom.outer_size.height == before + 2


async def test_counts_follow_steps_without_a_rescan(demo):
    """The counts panel is updated from each step's ClusterChanges; it must equal a full scan."""
    app = make_app(demo["image"], trace=demo["trace"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        initial = dict(app.counts)
        for key in ("n", "n", "n", "p", "n", "n"):
            await pilot.press(key)
            await settle(app, pilot)
            assert app.counts == app.model.count_types()
        assert app.counts != initial and app.counts["NORMAL"] > initial["NORMAL"]


async def test_fast_keys_run_in_order(demo):
    """Keys pressed without waiting run one at a time, in the order pressed."""
    seen = []
    app = make_app(demo["image"], trace=demo["trace"], counts=False)
    async with app.run_test(size=(120, 40), message_hook=seen.append) as pilot:
        for key in ("n", "n", "n", "p", "p", "p", "p", "n"):  # the 7th is one undo too many
            app.action_step(1 if key == "n" else -1)
        await settle(app, pilot)
        assert positions(seen) == [1, 2, 3, 2, 1, 0, 1]
        assert app.bench.position == 1


async def test_open_trace_from_the_app(demo):
    app = make_app(demo["image"], counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("n")  # nothing to step yet
        await settle(app, pilot)
        assert app.bench.replay is None
        await pilot.press("o")
        await pilot.pause()
        app.screen.query_one("#path-input").value = demo["trace"]
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.query_one(Timeline).row_count == 9
        assert app.bench.replay is not None  # opened for the preview of step 1
        assert "step 1, not applied yet" in plan_text(app) and "write -P 0x5a 5k 3k" in plan_text(app)
        await pilot.press("n")
        await settle(app, pilot)
        assert app.bench.position == 1
