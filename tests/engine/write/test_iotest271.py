"""QEMU iotest 271's catalogue (qemu tests/qemu-iotests/271, its normal cases): each step through qdebug and through
a live qemu-io on a twin image; the named clusters must show 271's bitmaps, and the two images must
end identical (guest data, metadata bytes, clean qemu-img check)."""

from __future__ import annotations

import subprocess

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.format.subclusters import bitmap_string
from tests.engine.harness import assert_same_metadata, check_verdict, qdebug_process, qemu_process, same_guest_data
from tests.qemu import QEMU_IMG, create

pytestmark = pytest.mark.qemu

A, Z, U = "N" * 8, "0" * 8, "-" * 8


def bm(*groups: str) -> str:
    return "_".join(groups)


ALL_N, ALL_0, ALL_U = bm(A, A, A, A), bm(Z, Z, Z, Z), bm(U, U, U, U)


def _images(tmp_path, size_k: int, backing: bool) -> tuple[str, str]:
    out = []
    for name in ("img", "ref"):
        d = tmp_path / name
        d.mkdir()
        if backing:
            (d / "base.raw").write_bytes(b"\xff" * (size_k << 10))
        out.append(create(str(d / "t.qcow2"), f"{size_k}k", backing="base.raw" if backing else None,
                          backing_fmt="raw"))
    return out[0], out[1]


def _bitmap(path: str, c: int, raw: bool = False):
    with open_image(path) as img:
        w0, b, _o, _i = img.l2_entry(c)
    return b if raw else bitmap_string(w0, b)


def run_catalogue(img: str, ref: str, steps) -> None:
    for cmds, expect in steps:
        if isinstance(cmds, str):
            cmds = [cmds]
        if cmds[0].startswith("!"):
            for path in (img, ref):
                subprocess.run([QEMU_IMG, "snapshot", "-c", "snap1", path], check=True)
            continue
        results = qdebug_process(img, cmds)
        assert [r.error for r in results] == [None] * len(cmds), cmds
        qemu_process(ref, cmds)
        for c, want in expect.items():
            got = _bitmap(img, c, raw=isinstance(want, int))
            assert got == want, f"after {cmds}: cluster {c} is {got}, 271 says {want}"
            assert got == _bitmap(ref, c, raw=isinstance(want, int))
    assert same_guest_data(img, ref)
    assert_same_metadata(img, ref)
    assert check_verdict(img)[0] == 0


STANDARD = [  # 9.1
    ("write 0 1k", {0: bm("N-------", U, U, U)}),
    ("write 3k 512", {0: bm("NN------", U, U, U)}),
    ("write 5k 1k", {0: bm("NNN-----", U, U, U)}),
    ("write 6k 2k", {0: bm("NNNN----", U, U, U)}),
    ("write 8k 6k", {0: bm("NNNNNNN-", U, U, U)}),
    ("write 15k 4k", {0: bm(A, "NN------", U, U)}),
    ("write 32k 1k", {0: bm(A, "NN------", "N-------", U)}),
    ("write 63k 4k", {0: bm(A, "NN------", "N-------", "-------N"), 1: bm("NN------", U, U, U)}),
    ("write -z 2k 2k", {0: bm("N0NNNNNN", "NN------", "N-------", "-------N")}),
    ("write -z 0 64k", {0: ALL_0}),
    ("write 0 64k", {0: ALL_N}),
    ("write -z -u 0 32k", {0: bm(Z, Z, A, A)}),
    ("write -z -u 0 64k", {0: ALL_0}),
    ("write 3k 512", {0: bm("0N000000", Z, Z, Z)}),
    ("write 0 64k", {0: ALL_N}),
    ("discard 0 64k", {0: ALL_0}),
    ("write -c 0 64k", {0: "C" * 8 + "_" + "C" * 8 + "_" + "C" * 8 + "_" + "C" * 8}),
    ("write 3k 512", {0: ALL_N}),
]


@pytest.mark.parametrize("backing", [False, True])
def test_271_standard_writes(qemu, engine_mode, tmp_path, backing):
    run_catalogue(*_images(tmp_path, 1024, backing), STANDARD)


def test_271_overwriting_several_clusters_without_cow(qemu, engine_mode, tmp_path):
    run_catalogue(*_images(tmp_path, 1024, False), [
        ("write 24k 40k", {0: bm(U, "----NNNN", A, A)}),
        ("write 90k 2k", {1: bm(U, "-----N--", U, U)}),
        (["write 156k 2k"], {}),
        ("write -z 156k 2k", {2: bm(U, "------0-", U, U)}),
        ("write 192k 34k", {3: bm(A, A, "N-------", U)}),
        ("write 24k 192k", {0: bm(U, "----NNNN", A, A), 1: ALL_N, 2: ALL_N, 3: bm(A, A, "N-------", U)}),
    ])


def _zero_steps(backing: bool, unmap: str):
    z = f"write -z {unmap}"
    return [
        (f"{z}0 192k", {0: ALL_0, 1: ALL_0, 2: ALL_0}),
        (f"{z}224k 128k", {3: bm(U, U, Z, Z), 4: ALL_0, 5: bm(Z, Z, U, U)}),
        (f"{z}415k 128k", {6: bm(U, "-------N" if backing else "-------0", Z, Z), 7: ALL_0,
                           8: bm(Z, "0000000N" if backing else Z, U, U)}),
        ("write 576k 576k", {c: ALL_N for c in range(9, 18)}),
        (f"{z}576k 192k", {9: ALL_0, 10: ALL_0, 11: ALL_0}),
        (f"{z}800k 128k", {12: bm(A, A, Z, Z), 13: ALL_0, 14: bm(Z, Z, A, A)}),
        (f"{z}991k 128k", {15: bm(A, A, Z, Z), 16: ALL_0, 17: bm(Z, "0000000N", A, A)}),
        *[(f"write -c {64 * c}k 64k", {}) for c in range(18, 29)],
        (f"{z}1152k 192k", {18: ALL_0, 19: ALL_0, 20: ALL_0}),
        (f"{z}1376k 128k", {21: ALL_N, 22: ALL_N, 23: ALL_N}),
        (f"{z}1567k 129k", {24: ALL_N, 25: ALL_N, 26: ALL_N}),
        (f"{z}1759k 128k", {27: bm(A, A, Z, Z), 28: ALL_0, 29: bm(Z, "0000000N" if backing else Z, U, U)}),
        (f"{z}1951k 8k", {30: bm(U, "-------N", "000N----", U) if backing else bm(U, "-------0", "0000----", U)}),
        (f"{z}2048k 35k", {32: bm(Z, Z, "00------", U)}),
    ]


@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("unmap", ["", "-u "], ids=["zero", "zero-unmap"])
def test_271_writing_zeroes(qemu, engine_mode, tmp_path, backing, unmap):
    run_catalogue(*_images(tmp_path, 2083, backing), _zero_steps(backing, unmap))


@pytest.mark.parametrize("backing", [False, True])
def test_271_discarding_clusters_with_nonzero_bitmaps(qemu, engine_mode, tmp_path, backing):
    img, ref = _images(tmp_path, 1024, backing)
    run_catalogue(img, ref, [("write 0 128k", {}), ("discard 0 128k", {0: ALL_0, 1: ALL_0})])
    for path in (img, ref):  # 271 pokes the first two bytes of c0's bitmap word to 0
        with open_image(path, writable=True) as im:
            _w0, _b, l2_off, idx = im.l2_entry(0)
            im.pwrite(l2_off + idx * 16 + 8, b"\0\0")
    run_catalogue(img, ref, [("discard 0 64k", {0: ALL_0 if backing else bm(Z, Z, U, U)})])


def test_271_cow_with_internal_snapshots(qemu, engine_mode, tmp_path):
    img, ref = _images(tmp_path, 1024, False)
    setup = [c for i in range(10) for c in (f"write -z {64 * i + 14}k 2k", f"write {64 * i + 26}k 2k",
                                            f"write {64 * i + 36}k 2k")]
    run_catalogue(img, ref, [(setup, {i: 0x0000008000042000 for i in range(10)}), ("!snapshot", {})])
    cmds = ["write 30k 1k", "write 84k 1k", "write 168k 1k", "write 218k 1k", "write 270k 1k", "write 321k 1k",
            "write -z 414k 3k", "write -z 474k 2k", "write -z 538k 1k", "write -z 588k 1k"]
    expect = {0: 0x000000800007E000, 1: 0x000000800007FC00, 2: 0x00000080001FE000, 3: 0x000000800007E000,
              4: 0x000000000007FF80, 5: 0x000000000007FFFF, 6: 0x0001808000042000, 7: 0x0000208000040000,
              8: 0x000000800007E000, 9: 0x000000C000042000}
    run_catalogue(img, ref, [(cmds, expect)])
    with open_image(img) as im:
        assert im.l2_offset(0) == 0x110000
        assert im.l2_entry(0)[0] == 0x8000000000120000
        assert im.l2_entry(6)[0] == 0x00000000000B0000  # kept, no COPIED: zeroed without COW
