"""Differential tests of the read side: guest data and `map` against qemu-img, over many shapes."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from qdebug.engine.file.chain import open_chain
from qdebug.engine.format.subclusters import SubclusterType, classify
from qdebug.engine.read.guest import read_guest
from qdebug.engine.read.l2tables import iter_l2_batches
from qdebug.engine.read.mapping import write_json
from qdebug.engine.read.summary import subcluster_counts
from tests.qemu import convert_raw, create, qemu_img, qemu_io, qemu_map_text

pytestmark = pytest.mark.qemu

# A mix of aligned/unaligned writes, zero writes (with and without unmap), discards and
# compressed clusters, scaled to the cluster size so every shape gets every subcluster type.
def _script(cs: int, size: int, compressed: bool) -> list[str]:
    sc = cs // 32
    cmds = [
        f"write -P 0x11 0 {sc}",
        f"write -P 0x12 {3 * sc + 100} 700",
        f"write -P 0x13 {cs - sc // 2} {sc}",
        f"write -z {cs + 4 * sc} {2 * sc}",
        f"write -P 0x14 {2 * cs} {cs}",
        f"write -z {2 * cs + 8 * sc} {4 * sc}",
        f"write -P 0x15 {3 * cs} {cs}",
        f"write -z -u {3 * cs} {cs}",
        f"write -P 0x16 {4 * cs + 5 * sc} {3 * sc}",
        f"discard {4 * cs} {cs}",
        f"write -P 0x17 {5 * cs + 17 * sc} {sc * 2 + 300}",
    ]
    if compressed:
        cmds += [f"write -c -P 0x18 {6 * cs} {cs}", f"write -c -P 0x19 {7 * cs} {cs}"]
    cmds += [f"write -P 0x1a {size - 1000} 1000"]
    return [c for c in cmds if _fits(c, size)]


def _fits(cmd: str, size: int) -> bool:
    off, ln = (int(x) for x in cmd.split()[-2:])
    return off + ln <= size


def _compare(img: str, tmp) -> None:
    expected = convert_raw(img, str(tmp / "expected.bin"))
    with open_chain(img) as chain:
        got = read_guest(chain, 0, chain.size)
        buf = io.StringIO()
        write_json(chain, buf)
    assert len(got) == len(expected)
    if got != expected:
        bad = next(i for i in range(len(got)) if got[i] != expected[i])
        raise AssertionError(f"guest data differs first at 0x{bad:x}")
    theirs = qemu_map_text(img)
    assert json.loads(buf.getvalue()) == json.loads(theirs)
    assert buf.getvalue() == theirs
    _check_counts(img)


def _check_counts(img: str) -> None:
    """The popcount-based whole-image counts equal a per-subcluster classify() of every entry."""
    with open_chain(img, no_backing=True) as chain:
        top = chain.top
        h = top.header
        ref = np.zeros(len(SubclusterType), dtype=np.int64)
        covered = 0
        for gcs, w0, bm in iter_l2_batches(top):
            ref += np.bincount(classify(w0, bm, extended=h.extended_l2).reshape(-1), minlength=len(ref))
            covered += len(gcs)
        ref[SubclusterType.UNALLOCATED_PLAIN] += (h.guest_clusters - covered) * h.subclusters_per_cluster
        assert subcluster_counts(top) == {t.name: int(ref[t]) for t in SubclusterType}


SHAPES = [
    # (cluster_size, extended, backing kind, size, extra create opts, compressed)
    ("64k", True, None, 1 << 20, {}, True),
    ("64k", False, None, 1 << 20, {}, True),
    ("16k", True, None, 300 * 1024 + 512, {}, True),
    ("2M", True, None, 20 << 20, {}, True),
    ("2M", False, None, 9 << 20, {}, False),
    ("64k", True, "raw", 1 << 20, {}, True),
    ("64k", True, "raw-short", 1 << 20, {}, False),
    ("64k", True, "qcow2", 1 << 20, {}, True),
    ("16k", True, "chain2", 512 * 1024, {}, False),
    ("64k", False, "qcow2", 1 << 20, {}, False),
    ("64k", True, None, 1 << 20, {"compression_type": "zstd"}, True),
    ("32k", True, "raw", 777 * 1024, {"compression_type": "zstd"}, True),
]


@pytest.mark.parametrize("cs,ext,backing,size,opts,compressed", SHAPES,
                         ids=[f"{s[0]}-{'ext' if s[1] else 'std'}-{s[2]}-{s[3]}-{s[4].get('compression_type', 'zlib')}"
                              for s in SHAPES])
def test_read_and_map_match_qemu(tmp_path, qemu, cs, ext, backing, size, opts, compressed):
    img = str(tmp_path / "top.qcow2")
    csz = int(cs[:-1]) * (1024 if cs[-1] == "k" else 1 << 20)
    b = None
    if backing in ("raw", "raw-short"):
        b = str(tmp_path / "base.raw")
        bsize = size if backing == "raw" else size // 3 + 4096 + 1000
        with open(b, "wb") as f:
            f.write(bytes([0xEE]) * bsize)
        # a hole in the raw file, so block status sees data and holes
        with open(b, "r+b") as f:
            f.seek(bsize // 2)
            f.write(bytes(4096))
        os.truncate(b, bsize)
        create(img, size, cluster_size=cs, extended_l2=ext, backing="base.raw", backing_fmt="raw", **opts)
    elif backing == "qcow2":
        b = create(str(tmp_path / "base.qcow2"), size, cluster_size="64k", extended_l2=True)
        qemu_io(b, f"write -P 0xee 0 {size // 2}", f"write -z {size // 4} 64k", f"write -P 0xed {size - 4096} 4096")
        create(img, size, cluster_size=cs, extended_l2=ext, backing="base.qcow2", backing_fmt="qcow2", **opts)
    elif backing == "chain2":
        b0 = create(str(tmp_path / "b0.qcow2"), size, cluster_size="64k", extended_l2=False)
        qemu_io(b0, f"write -P 0xe0 0 {size}")
        b1 = create(str(tmp_path / "b1.qcow2"), size // 2, cluster_size="16k", extended_l2=True,
                    backing="b0.qcow2", backing_fmt="qcow2")
        qemu_io(b1, "write -P 0xe1 8k 24k", "write -z 64k 16k")
        create(img, size, cluster_size=cs, extended_l2=ext, backing="b1.qcow2", backing_fmt="qcow2", **opts)
    else:
        create(img, size, cluster_size=cs, extended_l2=ext, **opts)
    for cmd in _script(csz, size, compressed):
        qemu_io(img, cmd)
    _compare(img, tmp_path)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(tmp_path, qemu, bits):
    img = create(str(tmp_path / "r.qcow2"), "4M", refcount_bits=bits)
    qemu_io(img, "write -P 0x21 0 100k", "write -c -P 0x22 1M 64k", "write -z 2M 64k")
    _compare(img, tmp_path)
    with open_chain(img) as chain:
        im = chain.top
        # header, reftable, refblock, L1 are all in use; compressed cluster host refcount is 1
        assert [im.refcount(i) for i in range(4)] == [1, 1, 1, 1]


def test_internal_snapshot_present(tmp_path, qemu):
    img = create(str(tmp_path / "s.qcow2"), "1M")
    qemu_io(img, "write -P 0x31 0 128k")
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 0x32 16k 2k")
    _compare(img, tmp_path)
    with open_chain(img) as chain:
        snaps = chain.top.snapshots()
    assert [s.name for s in snaps] == ["snap1"]


def test_preallocated_metadata_and_unaligned_size(tmp_path, qemu):
    img = create(str(tmp_path / "p.qcow2"), 5 * 1024 * 1024 + 3 * 512, preallocation="metadata")
    qemu_io(img, "write -P 0x41 100k 3k")
    _compare(img, tmp_path)


# ---- block status details qemu-img map shows -----------------------------------------------------
@pytest.mark.parametrize("cs", ["16k", "64k", "512k", "2M"])
@pytest.mark.parametrize("ext", [False, True], ids=["std", "ext"])
def test_metadata_preallocation_recurses_into_file_holes(tmp_path, qemu, cs, ext):
    """QEMU detects metadata preallocation (most referenced clusters are holes in the file) and then
    asks the file for NORMAL clusters' status: holes show as zero:true, data:true."""
    csz = int(cs[:-1]) * (1024 if cs[-1] == "k" else 1 << 20)
    img = create(str(tmp_path / "p.qcow2"), 24 * csz + 1536, cluster_size=cs, extended_l2=ext,
                 preallocation="metadata")
    qemu_io(img, "write -P 0x41 100k 3k", f"write -P 0x42 {5 * csz} {csz}", f"write -z {7 * csz} {csz // 2}",
            f"write -P 0x43 {9 * csz - 512} 1024", f"discard {11 * csz} {csz}", f"write -P 0x44 {23 * csz} 4096")
    _compare(img, tmp_path)


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_preallocation_falloc_full(tmp_path, qemu, mode):
    for ext in (False, True):
        img = create(str(tmp_path / f"{mode}{ext}.qcow2"), "3M", cluster_size="64k", extended_l2=ext,
                     preallocation=mode)
        qemu_io(img, "write -P 0x51 70k 5k", "write -z 1M 64k", "discard 2M 64k")
        _compare(img, tmp_path)


def test_backing_with_zero_alloc_and_unallocated_alloc(tmp_path, qemu):
    """ZERO_ALLOC and UNALLOCATED_ALLOC subclusters in the middle of the chain, under a top layer
    that leaves them visible, over a bottom layer with data everywhere."""
    base = create(str(tmp_path / "base.qcow2"), "2M", extended_l2=False)
    qemu_io(base, "write -P 0xb0 0 2M")
    mid = create(str(tmp_path / "mid.qcow2"), "2M", backing="base.qcow2")
    qemu_io(mid, "write -P 0x61 0 64k", "write -z 8k 4k", "write -P 0x62 128k 6k",  # UNALLOCATED_ALLOC around
            "write -P 0x63 256k 64k", "write -z 256k 64k",  # ZERO_ALLOC whole cluster (host kept)
            "write -P 0x64 512k 64k", "write -z 520k 10k")  # mixed NORMAL / ZERO_ALLOC
    top = create(str(tmp_path / "top.qcow2"), "2M", backing="mid.qcow2")
    qemu_io(top, "write -P 0x71 130k 2k", "write -z 600k 64k")
    _compare(top, tmp_path)
    _compare(mid, tmp_path)


@pytest.mark.parametrize("raw_size", [300 * 1024 + 77, 1024 * 1024 - 1, 5000])
def test_raw_backing_with_holes_and_odd_size(tmp_path, qemu, raw_size):
    raw = str(tmp_path / "base.raw")
    with open(raw, "wb") as f:
        for off in range(0, raw_size, 96 * 1024):  # data islands between holes
            f.seek(off)
            f.write(bytes([0xC0 + off // 98304 % 16]) * min(20 * 1024, raw_size - off))
    os.truncate(raw, raw_size)
    img = create(str(tmp_path / "top.qcow2"), "1M", backing="base.raw", backing_fmt="raw")
    qemu_io(img, "write -P 0x81 4k 2k", "write -z 200k 64k", "write -P 0x82 290k 20k")
    _compare(img, tmp_path)


@pytest.mark.parametrize("top_ext,mid_ext", [(True, False), (False, True), (True, True)])
def test_middle_layer_shorter_than_top(tmp_path, qemu, top_ext, mid_ext):
    base = create(str(tmp_path / "b0.qcow2"), "1M", extended_l2=False)
    qemu_io(base, "write -P 0xe0 0 1M")
    mid = create(str(tmp_path / "b1.qcow2"), 300 * 1024 + 512, cluster_size="32k", extended_l2=mid_ext,
                 backing="b0.qcow2")
    qemu_io(mid, "write -P 0xe1 8k 24k", "write -z 64k 16k", f"write -P 0xe2 {300 * 1024 - 512} 1k")
    top = create(str(tmp_path / "top.qcow2"), "1M", cluster_size="16k", extended_l2=top_ext, backing="b1.qcow2")
    qemu_io(top, "write -P 0xe3 290k 20k", "write -z 500k 8k")
    _compare(top, tmp_path)


def test_read_at_random_unaligned_ranges(tmp_path, qemu):
    """chain.read of random unaligned pieces equals the same slice of qemu-img convert's output,
    and `qdebug read` (the CLI) agrees with qemu-io's own read of a few of them."""
    import random
    import subprocess
    import sys

    base = create(str(tmp_path / "base.qcow2"), "2M", cluster_size="32k", extended_l2=False)
    qemu_io(base, "write -P 0xaa 0 1M", "write -c -P 0xab 1M 32k", "write -P 0xac 1056k 992k")
    img = create(str(tmp_path / "top.qcow2"), "2M", backing="base.qcow2")
    qemu_io(img, *_script(65536, 2 << 20, compressed=True))
    expected = convert_raw(img, str(tmp_path / "all.raw"))
    rng = random.Random(7)
    with open_chain(img) as chain:
        for _ in range(300):
            off = rng.randrange(len(expected))
            ln = rng.choice([1, 7, 511, 513, 2047, 4097, 65537, 200000])
            assert read_guest(chain, off, ln) == expected[off:off + ln], (off, ln)
    for off, ln in [(1, 4095), (65535, 3), (3 * 65536 - 7, 70001)]:
        got = subprocess.run([sys.executable, "-m", "qdebug.cli", "read", img, str(off), str(ln)],
                             capture_output=True, check=True).stdout
        dump = qemu_io(img, f"read -v {off} {ln}").stdout.decode()
        theirs = bytes(int(b, 16) for line in dump.splitlines() if line[8:11] == ":  "
                       for b in line[11:].split("  ")[0].split())
        assert got == theirs == expected[off:off + ln]
