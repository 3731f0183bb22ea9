"""The minimal-COW policy (whatif/stats --policy minimal-cow; NOT QEMU): on the seed's cluster it
copies 50 KiB where QEMU copies 54, and leaves `-`/`0` as they were; from the same image it always
copies QEMU's COW minus the avoidable part; only a dry run may plan with it."""

from __future__ import annotations

import random

import pytest

from qdebug.engine.errors import QcowError
from qdebug.engine.write.txn import WriteMode
from qdebug.engine.write.writer import WriteEngine
from qdebug.trace.commands import parse_trace
from qdebug.trace.replay import Replay, ReplayMode
from tests.qemu import create, qemu_img, qemu_io
from tests.qemu_costs import raw_file
from tests.trace.random_traces import random_trace, strip_comments

pytestmark = pytest.mark.qemu
K = 1024


def step(image: str, command: str, minimal: bool):
    with Replay(image, mode=ReplayMode.DRY_RUN) as r:
        if minimal:
            r.engine.use_minimal_cow()
        rec = r.step(parse_trace([command], "t")[0])
        assert rec is not None
        return rec


def seed_image(tmp_path) -> str:
    base = raw_file(tmp_path / "base.raw", 1 << 20)
    img = create(str(tmp_path / "seed.qcow2"), "1M", backing=base, backing_fmt="raw")
    qemu_io(img, "write -P 1 8k 4k", "write -P 2 16k 48k", "write -z 4k 2k", "write -z 14k 2k")
    qemu_img("snapshot", "-c", "s1", img)
    return img


def test_seed_example_copies_only_what_must_be_preserved(tmp_path):
    img = seed_image(tmp_path)
    qemu = step(img, "write -P 0x55 16k 2k", False)
    mini = step(img, "write -P 0x55 16k 2k", True)
    assert (qemu.cost.cow_bytes, qemu.cost.cow_avoidable_bytes) == (54 * K, 4 * K)
    assert (mini.cost.cow_bytes, mini.cost.cow_avoidable_bytes) == (50 * K, 0)
    (c,) = [c for c in qemu.plan.clusters if c.guest_cluster == 0]
    (d,) = [c for c in mini.plan.clusters if c.guest_cluster == 0]
    assert c.bitmap_after == "--0-NNNN_NNNNNNNN_NNNNNNNN_NNNNNNNN"
    assert d.bitmap_after == "--0-NN-0_NNNNNNNN_NNNNNNNN_NNNNNNNN"  # sc 6 still reads the backing file, 7 zeros
    (m,) = mini.plan.requests[0].metas
    assert [(r.offset, r.length) for r in m.regions] == [(8 * K, 4 * K), (18 * K, 46 * K)]


def test_from_the_same_image_minimal_is_qemus_cow_minus_the_avoidable(tmp_path):
    """Random images (writes, zero writes, discards, a snapshot) and random writes, each planned
    alone from the same state by both policies."""
    checked = avoided = 0
    for seed in range(3):
        rng = random.Random(seed)
        cs = rng.choice([16384, 65536, 131072])
        size = 32 * cs
        d = tmp_path / str(seed)
        d.mkdir()
        base = raw_file(d / "base.raw", size, 0x77)
        img = create(str(d / "r.qcow2"), size, cluster_size=str(cs), extended_l2=True, backing=base,
                     backing_fmt="raw")
        qemu_io(img, *(ln for ln in strip_comments(random_trace(seed, 40, size, cs)) if " -c " not in ln))
        if seed % 2:
            qemu_img("snapshot", "-c", "s", img)
        for _ in range(25):
            off = rng.randrange(size // 512) * 512
            n = min(rng.choice([512, 2048, 4096, 3 * cs // 2]), size - off)
            cmd = f"write -P 0x3c {off} {n}"
            q, m = step(img, cmd, False).cost, step(img, cmd, True).cost
            assert m.cow_bytes + m.zero_fill_bytes <= q.cow_bytes + q.zero_fill_bytes
            if not q.zero_fill_bytes and not m.zero_fill_bytes:
                assert m.cow_bytes == q.cow_bytes - q.cow_avoidable_bytes, cmd
                assert m.guest_write_bytes == q.guest_write_bytes and m.cow_avoidable_bytes == 0
                checked += 1
                avoided += q.cow_avoidable_bytes > 0
    assert checked >= 30 and avoided >= 2


def test_only_a_dry_run_plans_with_the_minimal_policy(tmp_path):
    img = create(str(tmp_path / "i.qcow2"), "1M")
    with Replay(img, mode=ReplayMode.WRITE_BACK) as r:
        with pytest.raises(QcowError, match="not QEMU's"):
            r.engine.use_minimal_cow()
    assert WriteEngine.__init__  # the engine itself refuses, whoever calls it
    with Replay(img, mode=ReplayMode.DRY_RUN) as r:
        assert r.engine.mode is WriteMode.SIMULATE
        r.engine.use_minimal_cow()
