"""The cost oracle (tests/qemu_costs.py) on cases computed by hand, before anything is compared
with it: the seed's example, the analytic 4 KiB case over a backing file full of data, QEMU's
zero-COW shortcut, COW through a two-deep chain and from a compressed cluster, and invariants on
random traces."""

from __future__ import annotations

import random
import shutil
import struct

import pytest

from tests.qemu import create, qemu_img, qemu_io
from tests.qemu_costs import analytic_case, qemu_costs, raw_file
from tests.trace.random_traces import random_trace, strip_comments

pytestmark = pytest.mark.qemu

K = 1024


def _l2_bitmap(path: str, guest_cluster: int) -> int:
    """The extended L2 bitmap of a guest cluster, read straight from the file (the spec's layout)."""
    with open(path, "rb") as f:
        data = f.read()
    cb, = struct.unpack_from(">I", data, 20)
    l1_off, = struct.unpack_from(">Q", data, 40)
    per_table = (1 << cb) // 16
    l2_off = struct.unpack_from(">Q", data, l1_off + 8 * (guest_cluster // per_table))[0] & 0x00FFFFFFFFFFFE00
    return struct.unpack_from(">Q", data, l2_off + 16 * (guest_cluster % per_table) + 8)[0]


def test_seed_example(qemu, tmp_path):
    """`--0-NN-0_NNNNNNNN_NNNNNNNN_NNNNNNNN`, shared with a snapshot, over a raw backing file full of
    data; a write to subcluster 8 copies subclusters 4-7 and 9-31: 54 KiB of COW (2 KiB subclusters)."""
    base = raw_file(tmp_path / "base.raw", 1 << 20)
    img = create(str(tmp_path / "seed.qcow2"), "1M", backing=base, backing_fmt="raw")
    qemu_io(img, "write -P 1 8k 4k", "write -P 2 16k 48k", "write -z 4k 2k", "write -z 14k 2k")
    assert _l2_bitmap(img, 0) == 0x00000084FFFFFF30  # --0-NN-0_NNNNNNNN_NNNNNNNN_NNNNNNNN
    qemu_img("snapshot", "-c", "s1", img)
    (c,) = qemu_costs(img, ["write -P 0x55 16k 2k"], [(base, "raw")])
    assert _l2_bitmap(img, 0) == 0x00000004FFFFFFF0  # --0-NNNN_NNNNNNNN_NNNNNNNN_NNNNNNNN
    assert (c.guest_write_bytes, c.cow_bytes, c.host_data_bytes) == (2 * K, 54 * K, 56 * K)
    # one read covers [8k, 64k) (both COW regions, 2 KiB of data between them): sc 4-5 and 8-31 from
    # the old cluster, sc 6 from the backing file, sc 7 (zero) from nowhere
    assert c.cow_read_bytes == {"this image": 52 * K, "backing depth 1": 2 * K}
    assert (c.zero_fill_bytes, c.skip_cow) == (0, 0)
    # a new L2 table (the old one is the snapshot's), one data cluster; writethrough writes whole
    # cache entries: the refcount block before the new table, the table, its L1 entry, the refcount
    # block again when freeing the old cluster makes refcounts wait for L2, then L2 and refcounts
    assert (c.allocated_clusters, c.l2_tables_allocated, c.refcount_blocks_allocated) == (1, 1, 0)
    assert c.metadata == {"refblock": 3 * 64 * K, "L2": 2 * 64 * K, "L1": 8}
    assert c.metadata_bytes == sum(c.metadata.values())
    assert c.file_size_after == max(c.file_size_before, c.host_write_end)


@pytest.mark.parametrize("cs, ext", [(65536, False), (65536, True), (131072, True), (262144, True),
                                     (524288, False), (2 << 20, True)])
def test_aligned_4k_writes_over_backing_data_cost_unit_minus_4k(qemu, tmp_path, cs, ext):
    """Each first touch of an allocation unit (the cluster; the subcluster with extended L2) costs
    unit - 4 KiB of COW from the backing file; later touches cost none."""
    img, base, unit, blocks, cmds = analytic_case(tmp_path, cs, ext, 30, 10)
    costs = qemu_costs(img, cmds, [(base, "raw")])
    touched: set[int] = set()
    firsts = 0
    for b, c in zip(blocks, costs):
        off = b * 4096
        units = set(range(off // unit, (off + 4095) // unit + 1))
        first = not units <= touched
        touched |= units
        cow = max(unit - 4096, 0) if first else 0
        firsts += first and cow > 0
        assert (c.cow_bytes, c.host_data_bytes) == (cow, 4096 + cow), (off, c)
        merged = cow and off % unit and (off + 4096) % unit  # both COW regions: one read with the data
        assert c.cow_read_bytes == ({"backing depth 1": cow + (4096 if merged else 0)} if cow else {}), (off, c)
        assert (c.zero_fill_bytes, c.skip_cow) == (0, 0)
        assert c.file_size_after == max(c.file_size_before, c.host_write_end)
    assert firsts >= 20 if unit > 4096 else firsts == 0


def test_zero_cow_shortcut_is_a_zero_fill_not_data(qemu, tmp_path):
    """No backing file: the COW of a 512-byte write is all zeros, so QEMU write-zeroes the whole
    subcluster span (data area included) and then writes the data (doc S02)."""
    img = create(str(tmp_path / "z.qcow2"), "1M")
    (c,) = qemu_costs(img, ["write -P 0x11 3k 512"])
    assert (c.host_data_bytes, c.cow_bytes, c.zero_fill_bytes, c.skip_cow) == (512, 0, 2 * K, 1)
    assert c.cow_read_bytes == {}


def test_cow_sources_through_a_two_deep_chain(qemu, tmp_path):
    base = raw_file(tmp_path / "base.raw", 1 << 20, 0xAB)
    mid = create(str(tmp_path / "mid.qcow2"), "1M", backing=base, backing_fmt="raw")
    qemu_io(mid, "write -P 0x22 2k 2k")  # mid: sc 1 data, the rest of cluster 0 falls through to base
    top = create(str(tmp_path / "top.qcow2"), "1M", backing=mid, backing_fmt="qcow2")
    (c,) = qemu_costs(top, ["write -P 0x33 1k 4k"], [(mid, "qcow2"), (base, "raw")])
    # write [1k, 5k): head [0, 1k) of sc 0, tail [5k, 6k) of sc 2; one read [0, 6k) includes the data area
    assert (c.cow_bytes, c.host_data_bytes) == (2 * K, 6 * K)
    assert c.cow_read_bytes == {"backing depth 1": 2 * K, "backing depth 2": 4 * K}


def test_cow_of_a_compressed_cluster(qemu, tmp_path):
    img = create(str(tmp_path / "c.qcow2"), "1M")
    qemu_io(img, "write -c -P 0x11 0 64k")
    (c,) = qemu_costs(img, ["write -P 0x22 3k 512"])
    assert (c.cow_bytes, c.host_data_bytes) == (64 * K - 512, 64 * K)
    assert c.cow_read_bytes == {"this image (compressed)": 64 * K}
    assert c.allocated_clusters == 1


@pytest.mark.parametrize("seed", range(4))
def test_invariants_on_random_traces(qemu, tmp_path, seed):
    rng = random.Random(seed)
    cs = rng.choice([16384, 65536, 131072])
    size = 4 << 20
    chain = []
    if seed % 2:
        chain = [(raw_file(tmp_path / "base.raw", size, 0x5A), "raw")]
    img = create(str(tmp_path / "r.qcow2"), size, cluster_size=str(cs), extended_l2=bool(seed % 3),
                 backing=chain[0][0] if chain else None, backing_fmt="raw")
    cmds = strip_comments(random_trace(seed, 40, size, cs))
    pristine = shutil.copyfile(img, tmp_path / "pristine.qcow2")
    costs = qemu_costs(img, cmds, chain)
    for c in costs:
        assert c.cow_bytes >= 0 and c.host_data_bytes >= 0 and "other" not in c.metadata, c
        if c.error:
            assert "-c" in c.command and c.host_data_bytes == 0, c  # compressed over data: EIO, nothing written
        assert c.metadata_bytes == sum(c.metadata.values())
        assert c.file_size_after == max(c.file_size_before, c.host_write_end), c
        if c.command.startswith("read") or c.command.startswith("flush"):
            assert (c.host_data_bytes, c.metadata_bytes, c.zero_fill_bytes) == (0, 0, 0)
        if c.guest_write_bytes and "-c" not in c.command:
            assert c.host_data_bytes >= c.guest_write_bytes
    for a, b in zip(costs, costs[1:]):
        assert b.file_size_before == a.file_size_after
    # the oracle's commands leave the same image as one plain qemu-io run of the trace
    qemu_io(str(pristine), *cmds, check=False)
    assert qemu_img("compare", "-q", str(pristine), img, check=False).returncode == 0
