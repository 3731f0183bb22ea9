"""Known-bug signatures: each rule on images QEMU itself damaged (where QEMU does), on every
corruption of the catalogue (no signature where the cause is not the known one), and on random
qemu-io traces (every corruption QEMU 7.2 made is explained, nothing else is flagged).

The versions a signature names were measured with QEMU 7.2.22 (the oracle here) and 10.0.2
(unpacked beside it from Debian bookworm-backports: `make qemu10`); with QDEBUG_QEMU10 set to
that directory, the QEMU-made cases run against 10.0.2 as well."""

from __future__ import annotations

import os
import shutil

import pytest

from qdebug.engine.check.checkfile import checked_file
from qdebug.engine.check.signatures import find_signatures
from tests.engine.corruptions import CORRUPTIONS, corrupt, make_shape
from tests.qemu import QEMU_IMG, QEMU_IO, run
from tests.trace.random_traces import random_trace

pytestmark = pytest.mark.qemu
QEMU10 = os.environ.get("QDEBUG_QEMU10")
VERSIONS = ["7.2"] + (["10.0.2"] if QEMU10 else [])
EXPECTED = {  # corruption -> the signature it shows (every other corruption shows none)
    "both_bits": "invalid-subcluster-bitmap", "both_bits_zero_sc": "invalid-subcluster-bitmap",
    "alloc_bits_unallocated": "invalid-subcluster-bitmap", "compressed_bitmap": "invalid-subcluster-bitmap",
    "data_past_eof": "data-past-eof",
}
PACKING_BUG = ["write -c -P 0x67 0 64k", "write -P 0x35 1k 3k", "write -P 0x3c 1M 512", "write -c -P 0x8a 2M 64k"]


def tools(version: str) -> tuple[str, str]:
    if version == "7.2":
        return QEMU_IMG, QEMU_IO
    return os.path.join(QEMU10, "usr/bin/qemu-img"), os.path.join(QEMU10, "usr/bin/qemu-io")


def signatures(path: str):
    with checked_file(path) as (img, report):
        return report, find_signatures(img, report)


def qemu_image(tmp_path, version: str, commands: list[str], *, extended: bool = True, size: str = "8M") -> str:
    img, io = tools(version)
    path = str(tmp_path / f"q{version}.qcow2")
    run(img, "create", "-q", "-f", "qcow2", "-o", f"extended_l2={'on' if extended else 'off'}", path, size)
    run(io, "-f", "qcow2", path, input="\n".join(commands).encode(), check=False)  # (write -c: EIO on allocated)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tests.qemu import require_qemu

    require_qemu()
    d = tmp_path_factory.mktemp("sig")
    return {name: make_shape(d, name) for name in ("ext64k", "std64k", "ext32k-snap")}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("extended", [True, False])
def test_the_compressed_packing_bug(tmp_path, version, extended):
    """QEMU's own write sequence: the signature names guest 1M's bytes, and qemu-io reading them
    back finds them changed; check said only OFLAG_COPIED refcount=2."""
    path = qemu_image(tmp_path, version, PACKING_BUG, extended=extended)
    report, found = signatures(path)
    assert [f.kind for f in report.findings] == ["copied-data"] and report.corruptions == 1
    (sig,) = found
    assert sig.name == "compressed-into-data-cluster" and sig.count == 1 and "10.0.2" in sig.produced_by
    (lo, hi), = sig.guest_ranges
    assert 1 << 20 < lo < hi <= (1 << 20) + 512  # inside the 512 bytes written at 1M
    assert "refcount=2" in sig.evidence[0] and "guest 0x200000" in sig.evidence[0]
    _img, io = tools(version)
    out = run(io, "-f", "qcow2", "-c", "read -P 0x3c 1M 512", path, check=False).stdout
    assert b"Pattern verification failed" in out


@pytest.mark.parametrize("version", VERSIONS)
def test_a_truncated_copy(tmp_path, version):
    """Data written by QEMU, the file cut: the data clusters past the end are named, with the
    bytes of the last one that remain; QEMU reads the lost ones as zeros."""
    path = qemu_image(tmp_path, version, ["write -P 0x11 0 1M"])
    os.truncate(path, 800000)
    _report, found = signatures(path)
    (sig,) = found
    assert sig.name == "data-past-eof" and sig.count == 9
    assert sig.guest_ranges[0][1] - sig.guest_ranges[0][0] < 65536 and "remain" in sig.evidence[0]
    _img, io = tools(version)
    out = run(io, "-f", "qcow2", "-c", "read -P 0 960k 64k", path, check=False).stdout
    assert b"Pattern verification failed" not in out  # zeros, and no error


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("shape", ["ext64k", "std64k", "ext32k-snap"])
def test_catalogue_shows_only_known_causes(shapes, shape, name, tmp_path):
    path = str(tmp_path / "img.qcow2")
    shutil.copy(shapes[shape], path)
    if corrupt(path, name) is None:
        pytest.skip("not applicable")
    _report, found = signatures(path)
    names = {s.name for s in found}
    if name == "truncate_tail":  # shows data-past-eof only when data clusters were cut
        assert names <= {"data-past-eof"}
    else:
        assert names == ({EXPECTED[name]} if name in EXPECTED else set())


def test_healthy_partial_clusters_at_the_end_are_not_data_past_eof(tmp_path):
    """With subclusters QEMU leaves a new cluster's unwritten tail out of the file."""
    path = qemu_image(tmp_path, "7.2", ["write -P 0x11 0 4k", "write -P 0x22 1M 2k"])
    with open(path, "rb") as f:
        assert len(f.read()) % 65536  # the file ends inside the last data cluster
    report, found = signatures(path)
    assert report.exit_code == 0 and found == ()


@pytest.mark.parametrize("extended", [True, False])
def test_random_traces_every_qemu_corruption_explained(tmp_path, extended):
    """Seeds 57 and 82 make QEMU 7.2 hit the packing bug; the others leave clean images."""
    for seed in (57, 82, 0, 1, 2, 3, 4, 5):
        path = qemu_image(tmp_path, "7.2", random_trace(seed, 60, 8 << 20), extended=extended)
        report, found = signatures(path)
        assert [s.name for s in found] == (["compressed-into-data-cluster"] if report.corruptions else []), seed
        assert bool(report.corruptions) == (seed in (57, 82)), seed
