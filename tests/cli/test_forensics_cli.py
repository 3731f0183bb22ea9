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
    text = qd("map", "--wide", path).stdout.splitlines()  # plain `map` is qemu-img's columns exactly
    assert qd("map", path).stdout == qemu_img("map", path).stdout.decode()
    (row,) = [ln for ln in text if "0x7770000" in ln]
    assert "past the end of the file (0x80000): reads as zeros" in row
    assert not any("past the end" in ln for ln in text if "0x50000" in ln)
    sub = qd("map", "--subclusters", path).stdout
    assert "0x7770000  [past the end of the file (0x80000): reads as zeros]" in sub
    rows = json.loads(qd("map", "--subclusters", "--output=json", path).stdout)  # one array, as map's
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


def _overlay(tmp_path, backing_dir=None):
    """disk.qcow2 over base.raw (in `backing_dir`, default beside it), data in both."""
    bdir = backing_dir or tmp_path
    bdir.mkdir(parents=True, exist_ok=True)
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = bdir / "base.raw"
    base.write_bytes(b"\xbb" * (1 << 20))
    name = "base.raw" if backing_dir is None else str(base)
    path = create(str(tmp_path / "disk.qcow2"), "1M", backing=name, backing_fmt="raw")
    qemu_io(path, "write -q -P 0x11 0 64k", "write -q -z 64k 64k")
    return path, str(base)


def test_salvage_whole_overlay_exit_0_and_names_the_files(qemu, tmp_path):
    path, base = _overlay(tmp_path)
    out, rep = tmp_path / "out.raw", tmp_path / "r.json"
    r = qd("salvage", path, "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    want = qemu_img("convert", "-O", "raw", path, str(tmp_path / "q.raw")) and open(tmp_path / "q.raw", "rb").read()
    assert open(out, "rb").read() == want
    j = json.load(open(rep))
    assert j["files"] == [path, base]
    assert j["summary"] == {**j["summary"], "lost": 0, "recovered": (1 << 20) - (64 << 10), "zero": 64 << 10}
    assert {r["status"] for r in j["ranges"]} == {"recovered", "zero"}
    assert "recovered" in r.stdout and "lost" in r.stdout and "data came from" in r.stdout
    r = qd("salvage", path, "-o", tmp_path / "out.qcow2", "-O", "qcow2")
    assert r.returncode == 0
    assert qemu_img("compare", str(tmp_path / "out.qcow2"), str(tmp_path / "q.raw")).returncode == 0
    assert qemu_img("check", str(tmp_path / "out.qcow2")).returncode == 0


def test_salvage_does_not_follow_backing_files_out_of_the_tree(qemu, tmp_path):
    path, base = _overlay(tmp_path / "img", tmp_path / "elsewhere")
    rep = tmp_path / "r.json"
    r = qd("salvage", path, "-o", tmp_path / "o.raw", "--report", rep)
    assert r.returncode == 1 and "outside the image's directory" in r.stdout
    j = json.load(open(rep))
    lost = [x for x in j["ranges"] if x["status"] == "lost"]
    assert lost and all("outside the image's directory" in x["reason"] for x in lost)
    assert sum(x["length"] for x in lost) == (1 << 20) - (128 << 10) and j["files"] == [path]
    assert not open(tmp_path / "o.raw", "rb").read()[128 << 10:].strip(b"\0")  # lost: zeros, never host data
    r = qd("salvage", path, "-o", tmp_path / "o.raw", "--backing-dir", tmp_path / "elsewhere")
    assert r.returncode == 0, r.stdout
    r = qd("salvage", path, "--allow-backing", base)
    assert r.returncode == 0


def test_salvage_never_writes_the_image_works_with_the_corrupt_bit_and_refuses_bad_outputs(qemu, tmp_path):
    path, _base = _overlay(tmp_path)
    with open(path, "r+b") as f:
        f.seek(72)
        f.write((0x12).to_bytes(8, "big"))  # corrupt bit + extended L2
    before = open(path, "rb").read()
    assert qd("salvage", path, "-o", tmp_path / "o.raw").returncode == 0
    assert open(path, "rb").read() == before
    r = qd("salvage", path, "-o", path)
    assert r.returncode == 2 and "refusing to write it" in r.stderr and open(path, "rb").read() == before
    r = qd("salvage", path, "-o", tmp_path)
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = qd("salvage", tmp_path / "missing.qcow2")
    assert r.returncode == 2 and r.stderr.startswith("qdebug: error:")
    assert not [p for p in tmp_path.iterdir() if "qdebug-salvage" in p.name]  # no temporary left behind


def test_salvage_honours_locks_like_qemu_img_convert(qemu, tmp_path):
    from tests.qemu import QEMU_IO

    path, _base = _overlay(tmp_path)
    holder = subprocess.Popen([QEMU_IO, "-f", "qcow2", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()
        r = qd("salvage", path, "-o", tmp_path / "o.raw")
        assert r.returncode == 2 and "Is another process using the image" in r.stderr
        q = subprocess.run(["qemu-img", "convert", "-O", "raw", path, str(tmp_path / "q.raw")], capture_output=True)
        assert q.returncode != 0  # qemu-img convert refuses as well
        r = qd("salvage", path, "-o", tmp_path / "o.raw", "-U")
        assert r.returncode == 0, r.stderr
    finally:
        holder.communicate(b"quit\n", timeout=30)


def test_salvage_orphans_are_saved_before_a_leak_repair_frees_them(qemu, tmp_path):
    """An L2 entry re-pointed at another entry's cluster: both ranges lost, the old cluster leaked;
    --orphans saves it (named by host offset and guess) and the exit code says something is lost."""
    path = create(str(tmp_path / "d.qcow2"), "1M")
    qemu_io(path, "write -q -P 0x11 0 64k", "write -q -P 0x22 64k 64k")
    _poke(path, 0x40010, (0x8000000000050000).to_bytes(8, "big"))  # guest cluster 1 -> cluster 0's data
    odir = tmp_path / "orphans"
    r = qd("salvage", path, "-o", tmp_path / "o.raw", "--orphans", odir)
    assert r.returncode == 1
    assert "host cluster mapped by two guest clusters" in r.stdout and "orphaned guest data: 1" in r.stdout
    saved = json.load(open(odir / "orphans.json"))
    assert [(o["host-offset"], o["guess"], o["leaked"]) for o in saved] == [(0x60000, "data", True)]
    assert open(odir / saved[0]["saved-as"], "rb").read() == b"\x22" * 65536


def test_repair_warns_before_freeing_leaked_guest_data(qemu, tmp_path):
    """An L1 entry zeroed: its L2 table and data are "leaked"; freeing them destroys the guest's
    data, so check -r and repair say so first and name salvage --orphans."""
    path = create(str(tmp_path / "g.qcow2"), "4M", cluster_size="16k")
    qemu_io(path, "write -q -P 0x11 0 64k")
    _poke(path, 0xC000, bytes(8))
    r = qd("repair", "--dry-run", path)
    assert "4 leaked cluster(s) to be freed look like guest data (host 0x14000, 0x18000" in r.stderr
    assert "--orphans DIR" in r.stderr
    r = qd("check", "-r", "leaks", path)
    assert "look like guest data" in r.stderr
    clean = create(str(tmp_path / "c.qcow2"), "4M")
    assert "guest data" not in qd("check", "-r", "leaks", clean).stderr
