"""The read-only views: the map, the inspector and the searches show what the engine reads."""

from __future__ import annotations

from qdebug.engine.file.chain import open_chain
from qdebug.engine.format.subclusters import bitmap_string
from qdebug.tui.app import make_app
from qdebug.tui.cluster_map import ClusterMap
from qdebug.tui.hex_view import HexView
from qdebug.tui.messages import CountsReady, Jumped
from qdebug.tui.model import READS_DATA, READS_INVALID
from tests.tui.conftest import settle


def row_text(cmap: ClusterMap, cluster: int) -> str:
    return cmap.render_row(cluster, False).text


async def test_map_rows_show_the_engines_bitmaps(layered):
    app = make_app(layered)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        cmap = app.query_one(ClusterMap)
        assert cmap.row_count == 64
        with open_chain(layered) as chain:
            for c in (0, 1, 3, 16, 32, 40):
                w0, bm, _, _ = chain.top.l2_entry(c)
                assert bitmap_string(w0, bm) in row_text(cmap, c)
        assert "--NN----_--------" in row_text(cmap, 0)  # the 3 KiB write at 5k: subclusters 2 and 3
        assert "CCCCCCCC" in row_text(cmap, 16)
        assert "!!!!!!!!" in row_text(cmap, 40)
        # cluster 0 reads from both layers; cluster 1 only from the backing file
        assert row_text(cmap, 0).rstrip().endswith("0+1")
        assert row_text(cmap, 1).rstrip().endswith("1")
        assert app.counts["COMPRESSED"] == 32 and app.counts["INVALID"] == 32


async def test_goto_offset_selects_cluster_and_subcluster(layered):
    app = make_app(layered, counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("g")
        await pilot.pause()
        for ch in "0x101800":
            await pilot.press(ch)
        await pilot.press("enter")
        await pilot.pause()
        cmap = app.query_one(ClusterMap)
        assert (cmap.cursor, cmap.subcluster) == (16, 3)
        hexv = app.query_one(HexView)
        assert hexv.base_offset == 0x101800
        assert hexv.data == b"\x33" * 2048


async def test_inspector_marks_where_bytes_come_from(layered):
    app = make_app(layered, counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        hexv = app.query_one(HexView)
        assert hexv.base_offset == 0 and hexv.data == b"\x11" * 2048 and set(hexv.src.tolist()) == {1}  # backing
        await pilot.press("right", "right")  # subcluster 2: the write at 5k, its head COWed from the backing file
        await pilot.pause()
        assert hexv.base_offset == 4096 and hexv.data[:1024] == b"\x11" * 1024 and hexv.data[1024:] == b"\x22" * 1024
        assert set(hexv.src.tolist()) == {0}  # all of it now lives in this image
        info = app.model.entry(0)
        assert info.reads[2] == READS_DATA and info.depth[2] == 0 and info.depth[0] == 1
        assert info.copied and info.refcount == 1


async def test_next_invalid_jumps_to_the_poked_entry(layered):
    seen = []
    app = make_app(layered, counts=False)
    async with app.run_test(size=(120, 40), message_hook=seen.append) as pilot:
        await pilot.press("i")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.query_one(ClusterMap).cursor == 40
        assert [m.cluster for m in seen if isinstance(m, Jumped)] == [40]
        assert app.model.entry(40).reads[0] == READS_INVALID
        hexv = app.query_one(HexView)
        assert set(hexv.src.tolist()) == {3}  # shown as ?? : QEMU fails the read
        await pilot.press("i")  # nothing after it
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert [m.cluster for m in seen if isinstance(m, Jumped)] == [40, None]
        await pilot.press("a")  # next allocated after 40: none (no cluster past 40 has a host cluster)
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("home", "z")  # first zero after cluster 0: the zero write at 200k
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.query_one(ClusterMap).cursor == 3


async def test_counts_arrive_from_a_worker(layered):
    seen = []
    app = make_app(layered)
    async with app.run_test(size=(80, 24), message_hook=seen.append) as pilot:
        await settle(app, pilot)
        counts = [m.counts for m in seen if isinstance(m, CountsReady)]
        assert counts and sum(counts[0].values()) == 64 * 32


async def test_command_palette_jumps_to_a_typed_cluster(layered):
    app = make_app(layered, counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        for ch in "cluster 40":
            await pilot.press("space" if ch == " " else ch)
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert app.query_one(ClusterMap).cursor == 40


async def test_bindings_are_remappable_by_id(layered):
    app = make_app(layered, counts=False, keymap={"next.invalid": "x"})
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("i")  # no longer bound
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.query_one(ClusterMap).cursor == 0
        await pilot.press("x")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.query_one(ClusterMap).cursor == 40
        rows = {bid: keys for keys, _desc, bid in app.help_rows()}
        assert rows["next.invalid"] == "x" and rows["step.next"] == "n/]" and rows["help"] == "?/f1"


async def test_inspector_shows_data_past_the_end_of_the_file(tmp_path):
    """Cluster 2 points at 0x7770000 in a 512 KiB file: not ordinary data, the inspector says so."""
    from tests.qemu import create, qemu_io

    path = create(str(tmp_path / "p.qcow2"), "512k")
    qemu_io(path, "write -q -P 7 0 192k")
    with open(path, "r+b") as f:
        f.seek(0x40020)
        f.write((0x8000000007770000).to_bytes(8, "big"))
    from qdebug.tui.inspector import entry_content

    app = make_app(path, counts=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        info = app.model.entry(2)
        assert info.host_past_eof and not app.model.entry(1).host_past_eof
        assert "past the end of the file (0x80000): reads as zeros" in entry_content(info, 0).plain
        sb = app.model.subcluster_bytes(2, 0)
        assert sb.data == bytes(2048) and "past the end of the file" in sb.sources[0].label
