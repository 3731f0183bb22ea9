"""create_image against `qemu-img create`: byte-identical files, clean check, same info."""

from __future__ import annotations

import json

import pytest

from qdebug.engine.errors import QcowError
from qdebug.engine.write.create import create_image
from tests.qemu import qemu_check, qemu_img, qemu_io

pytestmark = pytest.mark.qemu

CASES = [
    # size, cluster_size, extended_l2, refcount_bits, compression
    (1 << 20, 65536, True, 16, "zlib"),
    (0, 65536, True, 16, "zlib"),
    (1000, 65536, False, 16, "zlib"),
    (64 << 30, 16384, True, 16, "zlib"),
    (100 << 30, 16384, True, 64, "zstd"),
    (10 << 30, 512, False, 16, "zlib"),  # L1 needs 20 extra refcount blocks after it
    (10 << 30, 512, False, 64, "zlib"),  # ... and here the refcount table itself has to grow
    (3 << 30, 4096, False, 1, "zlib"),
    (5 << 30, 2 << 20, True, 8, "zstd"),
    (1 << 40, 65536, True, 2, "zlib"),
    (7 << 20, 131072, False, 4, "zlib"),
    (2 << 30, 8192, False, 32, "zlib"),
]


def _qemu_create(path, size, cs, ext, bits, comp, backing=None, fmt=None):
    args = ["create", "-q", "-f", "qcow2", "-o",
            f"cluster_size={cs},extended_l2={'on' if ext else 'off'},refcount_bits={bits},compression_type={comp}"]
    if backing:
        args += ["-b", backing, "-F", fmt]
    qemu_img(*args, path, str(size))


@pytest.mark.parametrize("size,cs,ext,bits,comp", CASES)
def test_same_bytes_as_qemu_img(qemu, tmp_path, size, cs, ext, bits, comp):
    mine, theirs = str(tmp_path / "mine.qcow2"), str(tmp_path / "qemu.qcow2")
    create_image(mine, size, cluster_size=cs, extended_l2=ext, refcount_bits=bits, compression_type=comp)
    _qemu_create(theirs, size, cs, ext, bits, comp)
    assert open(mine, "rb").read() == open(theirs, "rb").read()
    rc, report = qemu_check(mine)
    assert rc == 0 and report["check-errors"] == 0
    info = json.loads(qemu_img("info", "--output=json", mine).stdout)
    assert info["virtual-size"] == -(-size // 512) * 512 and info["cluster-size"] == cs
    assert info["format-specific"]["data"]["extended-l2"] == ext
    assert info["format-specific"]["data"]["refcount-bits"] == bits
    assert info["format-specific"]["data"]["compression-type"] == comp


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_with_backing_file_same_bytes_and_usable(qemu, tmp_path, fmt):
    base = tmp_path / f"base.{fmt}"
    if fmt == "raw":
        base.write_bytes(b"\xff" * (1 << 20))
    else:
        create_image(str(base), 1 << 20)
        qemu_io(str(base), "write -P 0xff 0 64k")
    mine, theirs = str(tmp_path / "mine.qcow2"), str(tmp_path / "qemu.qcow2")
    create_image(mine, 2 << 20, backing=base.name, backing_format=fmt)
    _qemu_create(theirs, 2 << 20, 65536, True, 16, "zlib", base.name, fmt)
    assert open(mine, "rb").read() == open(theirs, "rb").read()
    info = json.loads(qemu_img("info", "--output=json", mine).stdout)
    assert info["backing-filename"] == base.name and info["backing-filename-format"] == fmt
    qemu_io(mine, "read -P 0xff 0 64k", "write -P 0x11 4k 512", "read -P 0xff 0 4k")
    rc, _ = qemu_check(mine)
    assert rc == 0


@pytest.mark.parametrize("kwargs,msg", [
    (dict(cluster_size=8192, extended_l2=True), "at least 16384"),
    (dict(cluster_size=3000), "power of two"),
    (dict(refcount_bits=3), "Refcount width must be a power of two"),
    (dict(compression_type="lzo"), "compression-type.*lzo"),
    (dict(backing="nope.qcow2", backing_format="qcow2"), "not found"),
])
def test_bad_options_are_one_line_errors(tmp_path, kwargs, msg):
    with pytest.raises(QcowError, match=msg):
        create_image(str(tmp_path / "x.qcow2"), 1 << 20, **kwargs)


def test_too_large(tmp_path):
    with pytest.raises(QcowError, match="too large"):
        create_image(str(tmp_path / "x.qcow2"), 1025 << 40, cluster_size=65536, extended_l2=True)
