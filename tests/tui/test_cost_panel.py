"""The COW plan panel's cost lines: the step's cost, the running total as steps are applied and
taken back, and the seed's avoidable subclusters marked in the diagram."""

from __future__ import annotations

import pytest

from qdebug.tui.app import make_app
from tests.qemu import create, qemu_img, qemu_io
from tests.qemu_costs import raw_file
from tests.tui.conftest import settle

pytestmark = pytest.mark.qemu


def plan_text(app) -> str:
    return str(app.query_one("#plan").render())


async def test_cost_and_running_total_with_the_seeds_avoidable_subclusters(tmp_path):
    base = raw_file(tmp_path / "base.raw", 1 << 20)
    img = create(str(tmp_path / "seed.qcow2"), "1M", backing=base, backing_fmt="raw")
    qemu_io(img, "write -P 1 8k 4k", "write -P 2 16k 48k", "write -z 4k 2k", "write -z 14k 2k")
    qemu_img("snapshot", "-c", "s1", img)
    trace = tmp_path / "t"
    trace.write_text("write -P 0x55 16k 2k\nwrite -P 0x66 80k 4k\n")
    app = make_app(img, trace=str(trace), counts=False)
    async with app.run_test(size=(160, 60)) as pilot:
        await pilot.press("n")
        await settle(app, pilot)
        text = plan_text(app)
        (avoidable,) = [ln for ln in text.splitlines() if ln.startswith("avoidable")]
        # subclusters 6 and 7 of cluster 0: columns after the 10-character label and the frame
        assert avoidable[10:].split("│")[1].replace("_", "") == " " * 6 + "██" + " " * 24
        assert "cost      guest 2 KiB -> host data 56 KiB, COW 54 KiB (4 KiB avoidable)" in text
        assert "so far    guest 2 KiB -> host data 56 KiB, COW 54 KiB (4 KiB avoidable)" in text
        await pilot.press("n")
        await settle(app, pilot)
        text = plan_text(app)
        assert "avoidable" not in text.split("cost")[0]
        assert "so far    guest 6 KiB" in text and "cost      guest 4 KiB" in text
        await pilot.press("p")
        await settle(app, pilot)
        assert "so far    guest 2 KiB -> host data 56 KiB" in plan_text(app)
