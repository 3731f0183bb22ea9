"""Short writes on every write path: a disk that takes each `pwrite` only in part (as a nearly full
file system, a signal or a network file system may) must change nothing in what qdebug writes.

Every command that writes runs twice in-process, once on an honest disk and once with os.pwrite /
os.pwritev cut short and copy_file_range unavailable, and the files they leave must be byte for
byte the same; each command must really have met short writes (counted per command), so a write
path that bypasses the checked writes (`engine/file/fileio`) and drops the rest of a request
fails here."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from qdebug.engine.file.image import open_image
from tests.qemu import create, qemu_check, qemu_io

TRACE = """write -P 0x11 0 200k
write -P 0x22 1M 4k
write -z 2M 192k
discard 1M 64k
flush
write -P 0x33 3M 1M
write -c -P 0x44 8M 64k
"""


class ShortDisk:
    """os.pwrite writes a third of what it is given (at least one byte); pwritev only its first
    buffer, cut the same way; copy_file_range is refused (EXDEV), so copies go through pwrite."""

    def __init__(self, monkeypatch):
        self.short = 0
        real_pwrite = os.pwrite

        def pwrite(fd, data, offset):
            n = len(data)
            if n > 1:
                self.short += 1
                return real_pwrite(fd, memoryview(data).cast("B")[:max(1, n // 3)], offset)
            return real_pwrite(fd, data, offset)

        def pwritev(fd, bufs, offset):
            return pwrite(fd, bytes(bufs[0]), offset)

        def copy_file_range(*a, **k):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)


def _make_inputs(d: str) -> None:
    create(os.path.join(d, "base.qcow2"), "64M")
    qemu_io(os.path.join(d, "base.qcow2"), "write -q -P 0x7a 0 4M", "write -q -P 0x7b 9M 1M")
    create(os.path.join(d, "o.qcow2"), "64M", backing="base.qcow2")
    with open(os.path.join(d, "t.trace"), "w") as f:
        f.write(TRACE)
    r = os.path.join(d, "r.qcow2")  # five clusters whose subcluster 3 is allocated and zero: invalid
    create(r, "64M")
    qemu_io(r, *(f"write -q -P 0x{i + 1:02x} {i * 65536} 64k" for i in range(5)))
    with open_image(r) as image:
        l2 = image.l2_offset(0)
    with open(r, "r+b") as f:
        for i in range(5):
            f.seek(l2 + 16 * i + 8)
            (bm,) = struct.unpack(">Q", f.read(8))
            f.seek(l2 + 16 * i + 8)
            f.write(struct.pack(">Q", bm | 1 << 35))


def _commands(d: str) -> list[tuple[str, list[str], tuple[int, ...]]]:
    p = lambda n: os.path.join(d, n)  # noqa: E731
    return [
        ("create", ["create", "-q", p("a.qcow2"), "64M"], (0,)),
        ("replay (write-back)", ["replay", "-q", p("a.qcow2"), p("t.trace")], (0,)),
        ("replay --journal", ["replay", "-q", "--journal", p("o.qcow2"), p("t.trace")], (0,)),
        ("undo", ["undo", "-q", "--steps", "2", p("o.qcow2")], (0,)),
        ("repair", ["repair", "-q", p("r.qcow2")], (0,)),
        ("salvage -O raw", ["salvage", "-q", p("o.qcow2"), "-o", p("s.raw")], (0,)),
        ("salvage -O qcow2", ["salvage", "-q", p("o.qcow2"), "-O", "qcow2", "-o", p("s.qcow2")], (0,)),
        ("bundle", ["bundle", "-q", p("r.qcow2"), "-o", p("b.qcow2")], (0,)),
    ]


def _run_all(d: str, disk: ShortDisk | None, capsys) -> dict[str, int]:
    from qdebug.cli.main import main
    from qdebug.trace.replay import sparse_copy

    seen = {}
    for name, argv, codes in _commands(d):
        before = disk.short if disk else 0
        code = main(argv)
        out = capsys.readouterr()
        assert code in codes, (name, code, out.err)
        seen[name] = (disk.short if disk else 0) - before
    before = disk.short if disk else 0
    sparse_copy(os.path.join(d, "o.qcow2"), os.path.join(d, "copy.qcow2"))  # the TUI's session copy
    seen["sparse copy"] = (disk.short if disk else 0) - before
    return seen


def _bundle_body(path: str) -> bytes:
    """The bundle but its header cluster, which records the date it was made."""
    with open(path, "rb") as f:
        f.seek(65536)
        return f.read()


@pytest.mark.qemu
def test_every_write_path_survives_short_writes(tmp_path, qemu, monkeypatch, capsys):
    honest, short = tmp_path / "honest", tmp_path / "short"
    for d in (honest, short):
        d.mkdir()
        _make_inputs(str(d))
    _run_all(str(honest), None, capsys)
    seen = _run_all(str(short), ShortDisk(monkeypatch), capsys)
    monkeypatch.undo()

    missed = [name for name, n in seen.items() if n == 0]
    assert not missed, f"these write paths never met a short write (do they bypass fileio?): {missed}"
    for name in ("a.qcow2", "o.qcow2", "r.qcow2", "s.raw", "s.qcow2", "copy.qcow2"):
        a, b = (honest / name).read_bytes(), (short / name).read_bytes()
        assert a == b, f"{name} differs after short writes"
    assert _bundle_body(str(honest / "b.qcow2")) == _bundle_body(str(short / "b.qcow2"))
    for name in ("a.qcow2", "o.qcow2", "r.qcow2", "s.qcow2"):
        assert qemu_check(str(short / name))[0] == 0, name
    qemu_io(str(short / "a.qcow2"), "read -q -P 0x33 3M 1M", "read -q -P 0x11 0 200k")
