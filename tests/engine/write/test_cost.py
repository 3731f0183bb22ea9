"""Each step's cost (qdebug/engine/write/cost.py) against QEMU's own accounting (tests/qemu_costs.py):
the seed's example, the analytic case, and random traces over cluster sizes, extended L2 on and off,
refcount widths and backing chains (none, raw, qcow2, a short raw file), every field equal."""

from __future__ import annotations

import os
import random

import pytest

from tests.cost_compare import differences, qdebug_costs
from tests.qemu import create, qemu_img, qemu_io
from tests.qemu_costs import analytic_case, raw_file
from tests.trace.random_traces import random_trace, strip_comments

pytestmark = pytest.mark.qemu

K = 1024
# (cluster size, extended L2) pairs the random traces cycle through: QEMU allows extended L2 from 16 KiB
GEOMETRIES = [(4096, False), (16384, True), (65536, True), (65536, False), (131072, True), (524288, False),
              (2 << 20, True), (32768, True)]
RANDOM_TRACES = int(os.environ.get("QDEBUG_COST_TRACES", "104"))


def random_case(tmp_path, seed: int) -> tuple[str, list[str], list[tuple[str, str]]]:
    """An image (geometry, refcount width and backing chain by the seed) and a short random trace."""
    rng = random.Random(seed)
    cs, ext = GEOMETRIES[seed % len(GEOMETRIES)]
    size = max(4 << 20, 8 * cs)
    backing = ("none", "raw", "qcow2", "short raw")[seed // len(GEOMETRIES) % 4]
    chain: list[tuple[str, str]] = []
    if backing in ("raw", "short raw"):
        chain = [(raw_file(tmp_path / "base.raw", size if backing == "raw" else size // 3, rng.randrange(1, 256)), "raw")]
    elif backing == "qcow2":
        # whole clusters of data: QEMU's block status looks through a backing file's data clusters
        # into holes of its file (zero-filled parts of partly written clusters), which qdebug does not
        base = create(str(tmp_path / "base.qcow2"), size, extended_l2=rng.random() < 0.5)
        qemu_io(base, *(f"write -P 0x{i + 1:x} {c * 65536} {n * 65536}" for i, (c, n) in enumerate(
            (rng.randrange(size // 65536), rng.randrange(1, 4)) for _ in range(6)) if (c + n) * 65536 <= size))
        chain = [(base, "qcow2")]
    refcount_bits = rng.choice([16, 16, 1, 4, 8, 32, 64])
    img = create(str(tmp_path / "img.qcow2"), size, cluster_size=str(cs), extended_l2=ext,
                 backing=chain[0][0] if chain else None, backing_fmt=chain[0][1] if chain else None,
                 refcount_bits=refcount_bits)
    cmds = strip_comments(random_trace(seed, rng.randrange(8, 20), size, cs))
    return img, cmds, chain


@pytest.mark.parametrize("batch", range(8))
def test_random_traces_cost_what_qemu_says(tmp_path, batch):
    """RANDOM_TRACES random traces in 8 batches (two xdist workers share them), every step equal."""
    failures = []
    for seed in range(batch, RANDOM_TRACES, 8):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        img, cmds, chain = random_case(d, seed)
        failures += [f"seed {seed}: {f}" for f in differences(img, cmds, chain)]
    assert not failures, "\n".join(failures[:10])


def test_seed_example(tmp_path):
    """`--0-NN-0_NNNNNNNN_NNNNNNNN_NNNNNNNN` shared with a snapshot over a backing file full of data:
    a 2 KiB write to subcluster 8 copies subclusters 4-7 and 9-31 (54 KiB); 6 and 7 (4 KiB) for nothing."""
    base = raw_file(tmp_path / "base.raw", 1 << 20)
    img = create(str(tmp_path / "seed.qcow2"), "1M", backing=base, backing_fmt="raw")
    qemu_io(img, "write -P 1 8k 4k", "write -P 2 16k 48k", "write -z 4k 2k", "write -z 14k 2k")
    qemu_img("snapshot", "-c", "s1", img)
    assert differences(img, ["write -P 0x55 16k 2k"], [(base, "raw")]) == []
    (c,) = qdebug_costs(img + ".qdebug", ["write -P 0x55 16k 2k"])  # the pristine copy, as QEMU found it
    assert (c.guest_write_bytes, c.cow_bytes, c.cow_avoidable_bytes, c.host_data_bytes) == (2 * K, 54 * K, 4 * K,
                                                                                           56 * K)
    assert dict(c.cow_read_bytes) == {"this image": 52 * K, "backing depth 1": 2 * K, "zeros": 2 * K}
    assert dict(c.metadata) == {"refblock": 3 * 64 * K, "L2": 2 * 64 * K, "L1": 8}
    assert c.avoidable_share == pytest.approx(4 / 54)


@pytest.mark.parametrize("cs, ext", [(65536, False), (65536, True), (131072, True), (524288, False),
                                     (2 << 20, True)])
def test_aligned_4k_writes_over_backing_data_cost_unit_minus_4k(tmp_path, cs, ext):
    """The analytic case: each first touch of an allocation unit (the cluster; the subcluster with
    extended L2) costs unit - 4 KiB of COW from the backing file, later touches none; QEMU agrees."""
    img, base, unit, blocks, cmds = analytic_case(tmp_path, cs, ext, 20, 6)
    ours = qdebug_costs(img, cmds)
    touched: set[int] = set()
    for b, c in zip(blocks, ours):
        units = set(range(b * 4096 // unit, (b * 4096 + 4095) // unit + 1))
        cow = max(unit - 4096, 0) if not units <= touched else 0
        touched |= units
        assert (c.cow_bytes, c.host_data_bytes, c.cow_avoidable_bytes) == (cow, 4096 + cow, 0), (b, c)
    assert differences(img, cmds, [(base, "raw")]) == []


@pytest.mark.parametrize("seed", range(300))
def test_metadata_of_a_step_without_mid_step_flushes_counts_as_the_cache_model(seed):
    """The shortcut for steps whose cache operations never flush (dependencies one way only) counts
    the same bytes and requests as QEMU's cache model, which a flush after the last write forces
    (it writes what the end of the command would, in the same order)."""
    from qdebug.engine.write.cost import writethrough_metadata
    from qdebug.engine.write.txn import FLUSH_L2, L2_AFTER_REFCOUNT, REFCOUNT_AFTER_L2

    rng = random.Random(seed)
    slice_bytes, cs = rng.choice([(4096, 65536), (32768, 65536), (2048, 4096)])
    writes = []
    for _ in range(rng.randrange(0, 12)):
        what = rng.choice(["data", "cow", "zero", "L2", "L2", "refblock", "refblock", "L1", "header", "reftable"])
        n = rng.choice([2, 8, 16, 4096, 3 * slice_bytes]) if what in ("L2", "refblock") else rng.randrange(1, 9000)
        writes.append((rng.randrange(0, 8) * cs + rng.randrange(0, cs // 8) * 8, n, what))
    kind = rng.choice([L2_AFTER_REFCOUNT, REFCOUNT_AFTER_L2])
    ops = sorted((rng.randrange(0, len(writes) + 1), kind) for _ in range(rng.randrange(0, 4)))
    fast, model = {}, {}
    got = writethrough_metadata(writes, ops, slice_bytes, cs, fast)
    want = writethrough_metadata(writes, ops + [(len(writes), FLUSH_L2)], slice_bytes, cs, model)
    assert (got, fast) == (want, model)
