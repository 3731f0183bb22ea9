"""The forensics commands (layout, salvage, bundle) and the corrupt-entry behaviour of `read` and
`map`, through the command line: exit codes, one-line errors, what the text says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.qemu import create, qemu_img, qemu_io

pytestmark = pytest.mark.qemu


def qd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdebug.cli", *map(str, args)], capture_output=True, text=True)


def _poke(path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def test_map_shows_data_past_the_end_of_the_file(qemu, tmp_path):
    path = create(str(tmp_path / "p.qcow2"), "512k")
    qemu_io(path, "write -q -P 7 0 192k")
    _poke(path, 0x40020, (0x8000000007770000).to_bytes(8, "big"))
    text = qd("map", path).stdout.splitlines()
    (row,) = [ln for ln in text if "0x7770000" in ln]
    assert "past the end of the file (0x80000): reads as zeros" in row
    assert not any("past the end" in ln for ln in text if "0x50000" in ln)
    sub = qd("map", "--subclusters", path).stdout
    assert "0x7770000  [past the end of the file (0x80000): reads as zeros]" in sub
    rows = [json.loads(ln) for ln in qd("map", "--subclusters", "--output=json", path).stdout.splitlines()]
    assert [r.get("past-eof", False) for r in rows] == [False, False, True]
    # --output=json stays byte for byte qemu-img's (which reports the offset as data)
    assert qd("map", "--output=json", path).stdout == qemu_img("map", "--output=json", path).stdout.decode()


def test_read_over_an_invalid_entry_fails_and_leaves_the_image_alone(qemu, tmp_path):
    """`qdebug read` is qemu-io -r: EIO (exit 1, one line naming the entry), nothing written."""
    path = create(str(tmp_path / "a.qcow2"), "1M")
    qemu_io(path, "write -q 256k 1k")
    _poke(path, 0x4000F, b"\x01")
    before = open(path, "rb").read()
    r = qd("read", path, "0", "1k")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "invalid cluster entry found (L2 offset: 0x40000, L2 index: 0x0)" in r.stderr
    assert qd("read", path, "64k", "1k").returncode == 0
    assert open(path, "rb").read() == before
    _poke(path, 0x4000F, b"\x00")  # valid again; then guest cluster 0 gets data at an unaligned offset
    qemu_io(path, "write -q -P 1 0 2k")
    _poke(path, 0x40006, b"\x02")
    r = qd("read", path, "32k", "1k")
    assert r.returncode == 1 and "cluster allocation offset 0x" in r.stderr and "unaligned" in r.stderr
