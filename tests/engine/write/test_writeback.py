"""Write-back mode (metadata held back in overlay pages until a flush) against QEMU 7.2.

Every case runs the same commands through `qemu-io -t writeback` (one process per batch) and
through one WriteEngine per batch, in write-through and in write-back mode (`engine_mode`), and
compares guest data, metadata byte for byte (host offsets included) and `qemu-img check`'s verdict.
The cases aim at what write-back changes: metadata and guest data sharing a 4 KiB overlay page
(clusters under 4 KiB), clusters that held metadata reused for data in the same window, refcount
table growth, snapshots, compressed data, `read -P` checks, backing files, unaligned sizes.
"""

from __future__ import annotations

import os

import pytest

from tests.engine import harness
from tests.engine.harness import (
    assert_same_metadata,
    check_verdict,
    metadata,
    qdebug_process,
    qemu_process,
    same_guest_data,
)
from tests.qemu import create, qemu_img, qemu_io
from tests.trace.random_traces import random_trace, strip_comments


def _pair(tmp_path, size, **opts):
    mine = create(str(tmp_path / "mine.qcow2"), size, **opts)
    ref = create(str(tmp_path / "ref.qcow2"), size, **opts)
    return mine, ref


def _run(mine: str, ref: str, cmds: list[str]):
    """One process each; qdebug's results, qemu-io's output."""
    return qdebug_process(mine, cmds), qemu_process(ref, cmds)


def _same(mine: str, ref: str, *, file_size: bool = True) -> None:
    assert same_guest_data(mine, ref), "guest data differs"
    assert_same_metadata(mine, ref)
    vm, vr = check_verdict(mine), check_verdict(ref)
    assert vm[0] == vr[0], f"qemu-img check: qdebug's image {vm[1]} vs qemu's {vr[1]}"
    if file_size:
        assert os.path.getsize(mine) == os.path.getsize(ref), "file lengths differ"


def _no_failed_reads(results, out: str) -> None:
    assert "Pattern verification failed" not in out
    bad = [(r.command.text, r.error) for r in results if r.error and r.command.op == "read"]
    assert not bad, bad


# ---- clusters smaller than a page: metadata and data share overlay pages -------------------------
@pytest.mark.parametrize("cluster_size", ["512", "1k", "2k"])
@pytest.mark.parametrize("seed", [1])
def test_small_clusters_random_trace(tmp_path, qemu, engine_mode, cluster_size, seed):
    cs = {"512": 512, "1k": 1024, "2k": 2048}[cluster_size]
    size = 3 << 20
    mine, ref = _pair(tmp_path, size, cluster_size=cluster_size, extended_l2=False)
    lines = strip_comments(random_trace(seed * 31 + cs, 120, size, cluster_size=cs,
                                        mix=(("write", 35), ("unaligned", 10), ("zero", 15), ("discard", 15),
                                             ("multi", 15), ("compressed", 5))))
    _run(mine, ref, lines)
    _same(mine, ref)


@pytest.mark.parametrize("cluster_size", ["512", "1k", "2k"])
def test_new_l2_tables_and_refblocks_beside_data(tmp_path, qemu, engine_mode, cluster_size):
    """Each write needs a new L2 table (and now and then a refcount block) next to its data cluster,
    so a held-back table page also holds guest data written in the same window."""
    cs = {"512": 512, "1k": 1024, "2k": 2048}[cluster_size]
    per_l2 = cs // 8 * cs  # guest bytes one L2 table maps
    mine, ref = _pair(tmp_path, 64 * per_l2, cluster_size=cluster_size, extended_l2=False)
    cmds = [f"write -P {i + 1} {i * per_l2 + (i % 3) * cs} {cs // 2}" for i in range(48)]
    cmds += [f"read -P {i + 1} {i * per_l2 + (i % 3) * cs} {cs // 2}" for i in range(0, 48, 5)]
    results, out = _run(mine, ref, cmds)
    _no_failed_reads(results, out)
    _same(mine, ref)


@pytest.mark.parametrize("cluster_size", ["512", "1k", "2k"])
def test_freed_clusters_reused_at_once(tmp_path, qemu, engine_mode, cluster_size):
    """Discards and `write -z -u` free clusters in the middle of a held-back page; the next writes
    take them again (partial writes: the rest of the cluster is zeroed COW)."""
    cs = {"512": 512, "1k": 1024, "2k": 2048}[cluster_size]
    mine, ref = _pair(tmp_path, 1 << 20, cluster_size=cluster_size, extended_l2=False)
    cmds = [f"write -P {i + 1} {i * cs} {cs}" for i in range(24)]
    cmds += [f"discard {3 * cs} {2 * cs}", f"write -z -u {9 * cs} {3 * cs}", f"discard {17 * cs} {cs}"]
    cmds += [f"write -P 0x{0x80 + i:x} {(200 + 3 * i) * cs + 100} {cs // 4}" for i in range(8)]
    cmds += [f"read -P 0x80 {200 * cs + 100} {cs // 4}", f"read -P 0 {200 * cs} 100",
             f"read -P 0 {200 * cs + 100 + cs // 4} {cs - 100 - cs // 4}"]
    cmds += [f"write -P 0x{0x90 + i:x} {(400 + i) * cs} {cs}" for i in range(8)]
    results, out = _run(mine, ref, cmds)
    _no_failed_reads(results, out)
    _same(mine, ref)


# ---- refcount table growth -------------------------------------------------------------------------
@pytest.mark.parametrize("cluster_size", ["512", "1k"])
def test_refcount_table_grows_then_old_clusters_reused(tmp_path, qemu, engine_mode, cluster_size):
    """64-bit refcounts and small clusters: the refcount table grows (moves) inside one window, the
    clusters of the old table are freed and the next allocations take them for data."""
    cs = {"512": 512, "1k": 1024}[cluster_size]
    per_block = cs // 8
    n = per_block * per_block + 3 * per_block  # past what one refcount table cluster covers
    size = 2 * n * cs
    mine, ref = _pair(tmp_path, size, cluster_size=cluster_size, extended_l2=False, refcount_bits=64)
    cmds = [f"write -P 0x11 0 {n * cs // 2}", f"write -P 0x22 {size // 2} {n * cs // 2}"]
    cmds += [f"write -P {0x30 + i} {(size // 4) + i * 7 * cs + 3} {cs // 3}" for i in range(20)]
    cmds += [f"read -P 0x22 {size // 2} {n * cs // 2}"]
    results, out = _run(mine, ref, cmds)
    _no_failed_reads(results, out)
    _same(mine, ref)


def test_refcount_table_grows_twice_in_one_window_with_frees(tmp_path, qemu, engine_mode):
    size = 24 << 20
    mine, ref = _pair(tmp_path, size, cluster_size="512", extended_l2=False, refcount_bits=64)
    cmds = []
    for r in range(6):
        cmds += [f"write -P {r + 1} {r * (3 << 20)} 1M", f"discard {r * (3 << 20) + 4096} 64k",
                 f"write -P {0x40 + r} {r * (3 << 20) + (2 << 20) + 700} 3000"]
    cmds += ["read -P 1 0 4096", "read -P 6 " + str(5 * (3 << 20) + 65536 + 4096) + " 4096"]
    results, out = _run(mine, ref, cmds)
    _no_failed_reads(results, out)
    _same(mine, ref)


# ---- internal snapshots ---------------------------------------------------------------------------
@pytest.mark.parametrize("cluster_size", ["512", "2k", "64k"])
def test_snapshots_between_processes(tmp_path, qemu, engine_mode, cluster_size):
    """Writes after `qemu-img snapshot -c` un-share L2 tables and data clusters (refcount 2),
    discards drop references; a second snapshot and more writes in the next process."""
    cs = {"512": 512, "2k": 2048, "64k": 65536}[cluster_size]
    ext = cs >= 16384
    size = 4 << 20
    mine, ref = _pair(tmp_path, size, cluster_size=cluster_size, extended_l2=ext)
    batches = [
        [f"write -P {i + 1} {i * 5 * cs} {2 * cs}" for i in range(30)],
        [f"write -P 0x{0x60 + i:x} {i * 5 * cs + cs // 2} {cs // 4}" for i in range(0, 30, 2)]
        + [f"discard {i * 5 * cs} {cs}" for i in range(1, 30, 4)]
        + [f"write -z -u {7 * 5 * cs} {2 * cs}", f"write -P 0x77 {size - 3 * cs} {3 * cs}"],
        [f"write -P 0x{0xa0 + i:x} {i * 5 * cs + cs // 8} {cs}" for i in range(0, 30, 3)]
        + [f"discard {i * 5 * cs + cs} {cs}" for i in range(0, 30, 5)]
        + [f"write -P 0x{0xc0 + i:x} {i * 11 * cs} {cs // 2}" for i in range(10)],
    ]
    for k, cmds in enumerate(batches):
        if k:
            for p in (mine, ref):
                qemu_img("snapshot", "-c", f"s{k}", p)
        _run(mine, ref, cmds)
    _same(mine, ref)


# ---- compressed writes ------------------------------------------------------------------------------
@pytest.mark.parametrize("extended_l2", [True, False])
def test_packing_hazard_still_flagged(tmp_path, qemu, engine_mode, extended_l2):
    cmds = ["write -c -P 0x67 0 64k", "write -P 0x35 1k 3k", "write -P 0x3c 1M 512", "write -c -P 0x8a 2M 64k"]
    mine, ref = _pair(tmp_path, 64 << 20, extended_l2=extended_l2)
    results, _ = _run(mine, ref, cmds)
    assert [bool(r.hazards) for r in results] == [False, False, False, True]
    _same(mine, ref)
    assert check_verdict(mine)[0] != 0


@pytest.mark.parametrize("cluster_size", ["1k", "4k", "64k"])
def test_compressed_packing_with_frees_and_reuse(tmp_path, qemu, engine_mode, cluster_size):
    cs = {"1k": 1024, "4k": 4096, "64k": 65536}[cluster_size]
    mine, ref = _pair(tmp_path, 256 * cs, cluster_size=cluster_size, extended_l2=False)
    cmds = [f"write -c -P {i + 1} {i * cs} {cs}" for i in range(12)]
    cmds += [f"write -P 0x50 {3 * cs + 7} {cs // 2}", f"discard {5 * cs} {cs}", f"write -z -u {6 * cs} {cs}"]
    cmds += [f"write -P {0x60 + i} {(100 + 2 * i) * cs} {cs // 3}" for i in range(6)]
    cmds += [f"write -c -P {0x70 + i} {(150 + i) * cs} {cs}" for i in range(6)]
    cmds += [f"read -P 1 0 {cs}", f"read -P 0x70 {150 * cs} {cs}"]
    results, out = _run(mine, ref, cmds)
    _no_failed_reads(results, out)
    _same(mine, ref)


# ---- read -P checks and flush lines in the middle -----------------------------------------------
@pytest.mark.parametrize("cluster_size", ["512", "64k"])
def test_read_checks_and_flushes_mid_trace(tmp_path, qemu, engine_mode, cluster_size):
    cs = {"512": 512, "64k": 65536}[cluster_size]
    size = 512 * cs
    mine, ref = _pair(tmp_path, size, cluster_size=cluster_size, extended_l2=cs >= 16384)
    cmds = []
    for i in range(20):
        off = (i * 37 % 500) * cs + (i % 4) * 128
        cmds += [f"write -P {i + 1} {off} {cs + 256}", f"read -P {i + 1} {off} {cs + 256}"]
        if i % 6 == 5:
            cmds += ["flush", f"discard {(i * 37 % 500) * cs} {cs}", f"read -P 0 {(i * 37 % 500) * cs} {cs}"]
    results, out = _run(mine, ref, cmds)
    _no_failed_reads(results, out)
    _same(mine, ref)


# ---- backing files --------------------------------------------------------------------------------
@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cluster_size", ["1k", "64k"])
def test_backing_file_cow(tmp_path, qemu, engine_mode, backing_fmt, cluster_size):
    cs = {"1k": 1024, "64k": 65536}[cluster_size]
    size = 256 * cs
    base = str(tmp_path / f"base.{backing_fmt}")
    if backing_fmt == "raw":
        qemu_img("create", "-q", "-f", "raw", base, str(size - cs // 2))  # short, unaligned
        qemu_io(base, f"write -P 0x5a 0 {size // 2}", f"write -P 0x5b {size // 2} {size // 2 - cs}", fmt="raw")
    else:
        create(base, size - cs // 2, cluster_size="4k" if cs < 4096 else "16k", extended_l2=False)
        qemu_io(base, f"write -P 0x5a 0 {size // 2}", f"write -z {size // 4} {size // 8}")
    opts = dict(cluster_size=cluster_size, extended_l2=cs >= 16384, backing=base, backing_fmt=backing_fmt)
    mine = create(str(tmp_path / "mine.qcow2"), size, **opts)
    ref = create(str(tmp_path / "ref.qcow2"), size, **opts)
    lines = strip_comments(random_trace(cs + len(backing_fmt), 100, size, cluster_size=cs,
                                        mix=(("write", 40), ("unaligned", 20), ("zero", 15), ("discard", 10),
                                             ("multi", 15))))
    lines += [f"write -P 0x99 {size - cs - 100} {cs + 100}", f"read -P 0x99 {size - cs - 100} {cs + 100}"]
    results, out = _run(mine, ref, lines)
    _no_failed_reads(results, out)
    _same(mine, ref)


# ---- unaligned image sizes -----------------------------------------------------------------------
@pytest.mark.parametrize("cluster_size,size", [("512", 1000448), ("2k", 3 * 2048 * 256 + 1536),
                                               ("64k", (5 << 20) + 4608)])
def test_unaligned_image_size(tmp_path, qemu, engine_mode, cluster_size, size):
    cs = {"512": 512, "2k": 2048, "64k": 65536}[cluster_size]
    mine, ref = _pair(tmp_path, size, cluster_size=cluster_size, extended_l2=cs >= 16384)
    last = size - size % cs if size % cs else size - cs
    cmds = [f"write -P 0x31 {last} {size - last}", f"write -P 0x32 {last - 3 * cs} {cs + 512}",
            f"write -z {last - cs} 512", f"discard {last - 3 * cs} {cs}", f"write -P 0x33 {size - 512} 512",
            f"read -P 0x33 {size - 512} 512"]
    cmds += strip_comments(random_trace(size % 997, 60, size, cluster_size=cs,
                                        mix=(("write", 50), ("zero", 20), ("discard", 15), ("multi", 15))))
    results, out = _run(mine, ref, cmds)
    _no_failed_reads(results, out)
    _same(mine, ref)


# ---- a metadata cluster freed in the same window, past the end of the file, reused for data ---------
def test_old_refcount_table_past_eof_reused_as_zero_cow_data_cluster(tmp_path, qemu, monkeypatch):
    """512-byte clusters, 64-bit refcounts, a 512 MiB image: zero
    writes allocate only L2 tables (held back, so the file does not grow) until the refcount table
    has grown twice in the window. The second growth frees the first grown table (2 clusters past
    the end of the file, living only in the overlay); the next write takes its first cluster for an
    L2 table and its second for a data cluster whose COW is zeroed (handle_alloc_space). The zeros
    must win over the old table entries held in the overlay page. (Write-back only: the trace is
    long for QEMU, and write-through replays it right.)"""
    monkeypatch.setitem(harness.MODE, "writeback", True)
    size = 512 << 20
    mine, ref = _pair(tmp_path, size, cluster_size="512", extended_l2=False, refcount_bits=64)
    z = 7805 * 32768  # L2 tables (32 KiB of guest each) that bring the allocation front to the 2nd growth
    cmds = [f"write -z 0 {z}", f"write -P 0x11 {z + 7} 100", f"read -P 0 {z} 7", f"read -P 0x11 {z + 7} 100",
            f"read -P 0 {z + 107} 405"]
    results, out = _run(mine, ref, cmds)
    meta = metadata(ref)
    assert meta["reftable_offset"] == 0x408600  # QEMU grew (moved) the table twice, from 0x208400
    l2 = meta["l2"][z // 32768]
    assert int.from_bytes(l2[:8], "big") & 0x00FFFFFFFFFFFE00 == 0x208600  # the old table's 2nd cluster
    _no_failed_reads(results, out)  # the guest data that matters (qemu-img compare of the image is slow)
    assert_same_metadata(mine, ref)
    assert check_verdict(mine)[0] == check_verdict(ref)[0] == 0
    assert os.path.getsize(mine) == os.path.getsize(ref)


_OVERLAP_HAZARD = ["write -c -P 0x67 0 64k", "write -P 0x35 1k 3k", "write -P 0x3c 1G 512", "write -c -P 0x8a 2M 64k"]


def test_write_qemu_refuses_as_metadata_overlap_keeps_finished_steps_like_writethrough(tmp_path, qemu,
                                                                                       monkeypatch):
    """The packing hazard aimed at an L2 table: the cluster the COW freed is taken by the new L2
    table of guest 1G, and the stale compressed-packing offset points into it. QEMU's overlap check
    refuses the compressed write (EIO), marks the image corrupt and takes the driver away (`No
    medium found` after that); qdebug fails the same commands the same way. What reaches the file:
    write-back mode keeps every finished step's metadata, which is exactly what `qemu-io -t
    writethrough` leaves (see the next test for -t writeback)."""
    monkeypatch.setitem(harness.MODE, "writeback", True)
    cmds = _OVERLAP_HAZARD + ["write -P 1 3M 4k"]
    mine, ref = _pair(tmp_path, "4G")
    results = qdebug_process(mine, cmds)
    out = qemu_process(ref, cmds, cache="writethrough")
    assert "write failed: Input/output error" in out and "overlaps with active L2 table" in out
    assert results[3].error and "overlaps with active L2 table" in results[3].error
    assert out.count("No medium found") == 1 and "No medium found" in (results[4].error or "")
    _same(mine, ref)


@pytest.mark.xfail(strict=True, reason=(
    "known difference: when QEMU marks the image corrupt its driver is gone, and qemu-io -t writeback "
    "loses the L2 entries and refcounts still dirty in its caches; which ones depends on its cache flush "
    "order (l2_allocate flushes both caches, refcount blocks flush on allocation...), which qdebug does "
    "not model: its write-back mode keeps every finished step (as -t writethrough does, tested above)"))
def test_write_qemu_refuses_as_metadata_overlap_loses_what_qemu_writeback_cache_held(tmp_path, qemu,
                                                                                      monkeypatch):
    monkeypatch.setitem(harness.MODE, "writeback", True)
    mine, ref = _pair(tmp_path, "4G")
    results, out = _run(mine, ref, _OVERLAP_HAZARD)
    assert "write failed: Input/output error" in out and "overlaps with active L2 table" in out
    assert results[3].error and "overlaps with active L2 table" in results[3].error
    _same(mine, ref)


def test_compressed_cluster_packed_into_a_discarded_cluster_is_zero_after_its_data(tmp_path, qemu, engine_mode):
    """(Not write-back only: both modes.) QEMU's `discard` passes the freed cluster's discard down to
    the file (a punched hole), so compressed data packed into it later is followed by zeros; the host
    cluster holding compressed data is compared byte for byte (tests/cli same_images)."""
    from tests.cli.test_write_cli import same_images

    cmds = ["write -P 0x3c 0 64k", "discard 0 64k", "write -c -P 0x11 64k 64k"]
    mine, ref = _pair(tmp_path, 4 << 20)
    _run(mine, ref, cmds)
    same_images(mine, ref)
