"""Every measured QEMU 7.2 scenario of /work/shared/data/qemu72-subcluster-vectors.jsonl.

Each setup command runs in a fresh WriteEngine (a fresh qemu-io process: the allocator restarts
at 0), then the measured command. qdebug must give the recorded bitmaps and L2 words, and the same
image as QEMU run live on a copy: same guest data (qemu-img compare), same metadata bytes.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.format.subclusters import bitmap_string
from tests.engine.harness import assert_same_metadata, check_verdict, qdebug_process, qemu_process, same_guest_data
from tests.qemu import QEMU_IMG, create, qemu_io

pytestmark = pytest.mark.qemu

VECTORS = "/work/shared/data/qemu72-subcluster-vectors.jsonl"
_ALL = [json.loads(line) for line in open(VECTORS)] if os.path.exists(VECTORS) else []


def _clear_copied_c0(path: str) -> None:
    with open_image(path, writable=True) as img:
        w0, _bm, l2_off, idx = img.l2_entry(0)
        img.pwrite(l2_off + idx * 16, struct.pack(">Q", w0 & ~(1 << 63)))


def _make(tmp_path, vec) -> str:
    backing = vec["backing"]
    if backing == "base.raw":
        (tmp_path / backing).write_bytes(b"\xff" * (1 << 20))
    elif backing == "base.qcow2":
        create(str(tmp_path / backing), "1M", extended_l2=False)
        qemu_io(str(tmp_path / backing), "write -P 0xff 0 64k")
    img = str(tmp_path / vec["img"])
    create(img, "1M", backing=backing, backing_fmt=(backing or "").split(".")[-1] or None)
    return img


def _setup(path: str, setup: list[str], runner) -> None:
    for cmd in setup:
        if cmd.startswith("!qemu-img snapshot"):
            subprocess.run([QEMU_IMG, "snapshot", "-c", "s1", path], check=True)
        elif cmd.startswith("!") and "clr" in cmd:
            _clear_copied_c0(path)
        else:
            runner(path, [cmd])


def _entry(path: str, c: int) -> tuple[int, int]:
    with open_image(path) as img:
        w0, bm, _o, _i = img.l2_entry(c)
        return w0, bm


@pytest.mark.parametrize("vec", _ALL, ids=[v["title"].split()[0] for v in _ALL])
def test_vector(qemu, tmp_path, vec, engine_mode):
    img = _make(tmp_path, vec)
    _setup(img, vec["setup"], qdebug_process)
    for c, (before, _after, words_before, _wa) in vec["clusters"].items():
        w0, bm = _entry(img, int(c))
        assert bitmap_string(w0, bm) == before
        assert f"0x{w0:x}/{bm:016x}" == words_before, f"cluster {c} before"
    (result,) = qdebug_process(img, [vec["cmd"]])
    assert result.error is None, result.error
    for c, (before, after, _wb, words_after) in vec["clusters"].items():
        w0, bm = _entry(img, int(c))
        assert (bitmap_string(w0, bm), f"0x{w0:x}/{bm:016x}") == (after, words_after), f"cluster {c}"
        changed = {x.guest_cluster: (x.bitmap_before, x.bitmap_after) for x in result.plan.clusters}
        if int(c) in changed:
            assert changed[int(c)] == (before, after)
    # The same scenario live through QEMU: identical image.
    ref_dir = tmp_path / "qemu"
    ref_dir.mkdir()
    ref = _make(ref_dir, vec)
    _setup(ref, vec["setup"], lambda p, cmds: qemu_process(p, cmds))
    qemu_process(ref, [vec["cmd"]])
    assert same_guest_data(img, ref)
    assert_same_metadata(img, ref)
    assert check_verdict(img)[0] == check_verdict(ref)[0] == 0
