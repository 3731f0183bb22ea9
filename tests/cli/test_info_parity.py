"""`qdebug info` against `qemu-img info` 7.2: the text up to qdebug's own section line for line
(snapshot list included), and --output=json with every key of qemu-img's, the same values, in the
same order (qdebug adds one key, "qdebug", last)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from tests.qemu import QEMU_IMG, create, qemu_img, qemu_io


def qdebug_info(path: str, *extra: str, cwd=None) -> str:
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "info", *extra, path], capture_output=True, cwd=cwd,
                       env={**os.environ, "PYTHONPATH": os.getcwd(), "TZ": "Europe/Berlin"})
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def qemu_info(path: str, *extra: str, cwd=None) -> str:
    p = subprocess.run([QEMU_IMG, "info", *extra, path], capture_output=True, cwd=cwd,
                       env={**os.environ, "TZ": "Europe/Berlin"})
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def add_snapshot_entry(path: str, *, extra: bytes, sid: bytes, name: bytes, date: tuple[int, int],
                       clock_ns: int, vm_size32: int) -> None:
    """Append a second snapshot table (one entry of the given layout) at a new cluster at the end
    of the file and point the header at it: old-style entries (16 bytes of extra data, no icount)
    and 64-bit VM state sizes that qemu-img snapshot never writes."""
    with open(path, "r+b") as f:
        head = f.read(104)
        cs = 1 << struct.unpack_from(">I", head, 20)[0]
        nb, table = struct.unpack_from(">IQ", head, 60)
        f.seek(0, os.SEEK_END)
        at = -(-f.tell() // cs) * cs
        old = b""
        if nb:
            f.seek(table)
            old = f.read(cs)  # the existing entries (one cluster is plenty here)
            size = 0
            for _ in range(nb):
                id_len, name_len = struct.unpack_from(">HH", old, size + 12)
                extra_len = struct.unpack_from(">I", old, size + 36)[0]
                size += 40 + extra_len + id_len + name_len
                size += -size % 8
            old = old[:size].ljust(size, b"\0")  # (the table may end the file, unpadded)
        entry = struct.pack(">QIHHIIQII", 0, 0, len(sid), len(name), date[0], date[1], clock_ns, vm_size32,
                            len(extra)) + extra + sid + name
        entry += bytes(-len(entry) % 8)
        f.seek(at)
        f.write((old + entry).ljust(cs, b"\0"))
        f.seek(60)
        f.write(struct.pack(">IQ", nb + 1, at))


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    out = {}
    out["v3"] = create(str(d / "v3.qcow2"), "4M")
    out["plain"] = create(str(d / "plain.qcow2"), "1G", extended_l2=False)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), "1000")
    out["v2"] = str(d / "v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd,lazy_refcounts=on,refcount_bits=64",
             str(d / "zstd.qcow2"), "3G")
    out["zstd"] = str(d / "zstd.qcow2")
    base = create(str(d / "base.qcow2"), "4M")
    out["backed"] = create(str(d / "top.qcow2"), "4M", backing="base.qcow2", backing_fmt="qcow2")
    (d / "sub").mkdir()
    out["backed-subdir"] = create(str(d / "sub" / "top.qcow2"), "4M", backing=base, backing_fmt="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2",
             str(d / "v2top.qcow2"))
    out["v2-backed"] = str(d / "v2top.qcow2")
    snap = create(str(d / "snap.qcow2"), "4M")
    qemu_io(snap, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "first", snap)
    qemu_img("snapshot", "-c", "a tag longer than sixteen", snap)
    add_snapshot_entry(snap, extra=struct.pack(">QQ", 5 << 30, 4 << 20), sid=b"7", name=b"old-style",
                       date=(1700000000, 123456789), clock_ns=3723_456_000_000, vm_size32=0)
    out["snapshots"] = snap
    v2snap = str(d / "v2snap.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2snap, "4M")
    add_snapshot_entry(v2snap, extra=b"", sid=b"1", name=b"v2", date=(1600000000, 5), clock_ns=999_999_999,
                       vm_size32=123456)
    out["v2-snapshots"] = v2snap
    for name, bits in (("dirty", 1), ("corrupt", 2)):
        p = create(str(d / f"{name}.qcow2"), "4M", lazy_refcounts="on")
        with open(p, "r+b") as f:
            f.seek(72)
            flags = struct.unpack(">Q", f.read(8))[0] | bits
            f.seek(72)
            f.write(struct.pack(">Q", flags))
        out[name] = p
    return d, out


KINDS = ["v3", "plain", "v2", "zstd", "backed", "backed-subdir", "v2-backed", "snapshots", "v2-snapshots", "dirty",
         "corrupt"]


@pytest.mark.parametrize("kind", KINDS)
def test_info_json_has_qemu_imgs_keys_values_and_order(images, qemu, kind):
    d, out = images
    path = out[kind]
    for name, cwd in ((os.path.relpath(path, d), d), (path, None)):  # relative and absolute names
        mine = json.loads(qdebug_info(name, "--output=json", cwd=cwd))
        assert list(mine)[-1] == "qdebug"
        del mine["qdebug"]
        ref = qemu_info(name, "--output=json", cwd=cwd)
        assert json.dumps(mine, indent=4) + "\n" == ref


@pytest.mark.parametrize("kind", KINDS)
def test_info_text_is_qemu_imgs_up_to_qdebugs_section(images, qemu, kind):
    d, out = images
    path = out[kind]
    for name, cwd in ((os.path.relpath(path, d), d), (path, None)):
        mine = qdebug_info(name, cwd=cwd)
        assert mine[:mine.index("qdebug:\n")] == qemu_info(name, cwd=cwd)


def test_snapshot_list_columns(images, qemu):
    _d, out = images
    text = qdebug_info(out["snapshots"])
    rows = text.splitlines()
    at = rows.index("Snapshot list:")
    assert rows[at + 1] == "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
    assert rows[at + 4] == "7         old-style           5 GiB 2023-11-14 23:13:20 01:02:03.456           "
    assert json.loads(qdebug_info(out["snapshots"], "--output=json"))["snapshots"][0]["icount"] == 0
