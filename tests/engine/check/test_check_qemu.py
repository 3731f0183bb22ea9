"""`check_image` against `qemu-img check`: every count and the exit code, over many image shapes,
each with every corruption of the generator (and random bitmap/refcount damage)."""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest

from qdebug.engine.check.checker import JSON_KEYS, check_image
from qdebug.engine.file.image import open_image
from tests.engine.corruptions import CORRUPTIONS, SHAPES, Layout, corrupt, make_shape
from tests.qemu import qemu_check

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tests.qemu import require_qemu

    require_qemu()
    d = tmp_path_factory.mktemp("shapes")
    return {name: make_shape(d, name) for name in SHAPES}


def _ours(path):
    with open_image(path) as img:
        return check_image(img)


def _assert_same(path):
    rc, theirs = qemu_check(path)
    ours = _ours(path)
    if not theirs:  # qemu-img could not even open the image
        assert rc == 1 and ours.exit_code == 1 and ours.findings[-1].kind == "check-failed"
        return ours
    mine = ours.counts()
    mine["filename"] = theirs.get("filename")
    assert mine == theirs, "\n".join(f.message for f in ours.findings)
    assert list(mine) == list(theirs)  # same keys in the same order
    assert ours.exit_code == rc
    return ours


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_healthy_shapes_are_clean_and_counted_alike(shapes, shape):
    ours = _assert_same(shapes[shape])
    assert ours.exit_code == 0
    assert all(f.severity == "info" for f in ours.findings)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_corruption_counts_equal_qemu(shapes, shape, name, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes[shape], path)
    if corrupt(path, name) is None:
        pytest.skip(f"{shape} has nothing to corrupt with {name}")
    ours = _assert_same(path)
    if name not in ("corrupt_bit", "dirty_bit"):
        assert ours.exit_code != 0
    else:
        assert any(f.kind.replace("-", "_") == name for f in ours.findings)


def test_findings_name_their_place(shapes, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes["ext64k"], path)
    corrupt(path, "both_bits")
    f = next(f for f in _ours(path).findings if f.kind == "invalid-bitmap-allocated")
    lay = Layout(path)
    e = lay.normal()[0]
    assert (f.l1_index, f.l2_index, f.subclusters) == (e[3], e[4], (3,))
    assert f.guest_offset == (e[3] * lay.h.l2_entries + e[4]) * lay.cs
    assert f.host_offset == e[1] & 0x00FFFFFFFFFFFE00
    assert f.message == f"ERROR offset={f.host_offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"


@pytest.mark.parametrize("seed", range(int(os.environ.get("QDEBUG_CHECK_SEEDS", "6"))))
def test_random_damage_counts_equal_qemu(shapes, seed, tmp_path):
    """Random words of L2 tables, L1 and refcount blocks overwritten: the counts still agree."""
    rng = random.Random(seed)
    shape = rng.choice(sorted(SHAPES))
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes[shape], path)
    lay = Layout(path)
    with open(path, "r+b") as f:
        for _ in range(rng.randint(1, 6)):
            e = rng.choice(lay.entries)
            which = rng.random()
            if which < 0.5 and lay.h.extended_l2:
                f.seek(e[0] + 8)
                f.write(struct.pack(">Q", e[2] ^ (1 << rng.randrange(64))))
            elif which < 0.8:
                f.seek(e[0])
                f.write(struct.pack(">Q", e[1] ^ (1 << rng.choice([63, 62, 0, 9, 16, 20, 30, 57]))))
            else:
                blk = lay.reftable[0] & ~0x1FF
                f.seek(blk + rng.randrange(64) * lay.h.refcount_bits // 8 // 8 * 8)
                f.write(bytes([rng.randrange(4)]))
    _assert_same(path)


def test_json_keys_are_qemus():
    assert set(JSON_KEYS) == {"image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
                              "corruptions-fixed", "check-errors", "leaks", "leaks-fixed", "allocated-clusters",
                              "filename", "format", "fragmented-clusters"}


def test_progress_reports_every_batch_of_l2_tables(tmp_path):
    """A 64 GiB preallocated image has 256 L2 tables: progress goes one batch at a time (16, 32, ...
    of 256)."""
    from qdebug.engine.check.checker import _BATCH_TABLES
    from tests.qemu import create

    path = create(str(tmp_path / "p.qcow2"), "64G", preallocation="metadata")
    calls = []
    with open_image(path) as img:
        report = check_image(img, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 256) for done in range(_BATCH_TABLES, 257, _BATCH_TABLES)] and len(calls) > 1
    assert report.allocated_clusters == report.total_clusters == (64 << 30) // 65536
    assert qemu_check(path)[1]["allocated-clusters"] == report.allocated_clusters


def test_sparse_entries_are_the_non_zero_entries():
    """The sparse path's search (8 mask bytes at a time) finds exactly the entries with a non-zero
    word, with their words, for extended and standard L2 tables."""
    import numpy as np

    from qdebug.engine.check.checker import _sparse_entries

    class Ctx:  # the geometry _sparse_entries reads
        def __init__(self, ext, n):
            self.h = type("H", (), {"extended_l2": ext, "l2_entries": n})()

    rng = np.random.default_rng(7)
    for ext in (True, False):
        for tables, n, hits in [(3, 4096, 0), (5, 4096, 40), (2, 2048, 3000), (4, 32, 10), (1, 64, 64)]:
            per = 2 if ext else 1
            raw = np.zeros((tables, n * per), dtype=np.uint64)
            if hits:
                raw.reshape(-1)[rng.choice(raw.size, hits, replace=False)] = rng.integers(1, 1 << 62, hits,
                                                                                        dtype=np.uint64)
            ent, w0, bm = _sparse_entries(Ctx(ext, n), raw, raw != 0)
            pairs = raw.reshape(-1, per)
            want = np.flatnonzero((pairs != 0).any(axis=1))
            assert np.array_equal(ent, want)
            assert np.array_equal(w0, pairs[want, 0].byteswap() if np.little_endian else pairs[want, 0])
            if ext:
                assert np.array_equal(bm, pairs[want, 1].byteswap() if np.little_endian else pairs[want, 1])
            else:
                assert bm is None


@pytest.mark.parametrize("extended_l2", [True, False])
def test_l2_table_cut_by_end_of_file_counts_equal_qemu(tmp_path, extended_l2):
    """The last L2 table runs past the end of the file (zeros there, as QEMU reads it), with only
    zero-flagged entries in the part that is left."""
    from tests.qemu import create, qemu_io

    path = create(str(tmp_path / "cut.qcow2"), "8G", extended_l2=extended_l2)
    qemu_io(path, "write -P 1 0 64k", "write -z 4G 64k")  # the second L2 table is allocated last
    with open_image(path) as img:
        import numpy as np

        l1 = img.l1.astype(np.uint64) & np.uint64(0x00FFFFFFFFFFFE00)
        table = int(l1[(4 << 30) // (img.header.l2_entries * img.header.cluster_size)])
        assert table and table + img.header.cluster_size >= img.file_size
    os.truncate(path, table + 4096)
    _assert_same(path)


@pytest.fixture(scope="module")
def many_tables(tmp_path_factory):
    """Ten L2 tables, each with normal, zero and partly written clusters (and one compressed)."""
    from tests.qemu import create, qemu_io

    path = create(str(tmp_path_factory.mktemp("many") / "m.qcow2"), "4G")
    table = 4096 * 65536  # guest bytes one L2 table maps
    cmds = []
    for t in range(10):
        b = t * table + t * 65536
        cmds += [f"write -P {t + 1} {b} 64k", f"write -z {b + 65536} 64k", f"write -P 9 {b + 131072 + 4096} 2k"]
    qemu_io(path, *cmds)
    qemu_io(path, f"write -c -P 7 {3 * table + (1 << 20)} 64k")
    return path


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_sparse_batches_checked_together_count_as_qemu(many_tables, name, tmp_path, monkeypatch):
    """One table per batch, four batches checked as one: counts equal qemu-img's, and the findings
    (order included) equal those of checking every batch alone."""
    import qdebug.engine.check.checker as check

    path = str(tmp_path / "img.qcow2")
    shutil.copy(many_tables, path)
    if corrupt(path, name) is None:
        pytest.skip(f"nothing to corrupt with {name}")
    monkeypatch.setattr(check, "_BATCH_TABLES", 1)
    monkeypatch.setattr(check, "_MERGE_BATCHES", 1)
    alone = _ours(path).findings
    monkeypatch.setattr(check, "_MERGE_BATCHES", 4)
    ours = _assert_same(path)
    assert ours.findings == alone
