"""Writes never surprise: every command that does not say it writes leaves the image and its
backing files byte for byte and mtime for mtime as they were, even the images QEMU itself would
write on open (dirty bit: QEMU repairs it; unknown autoclear bits: QEMU clears them)."""

from __future__ import annotations

import os

import pytest

from tests.hostile.conftest import qd
from tests.hostile.driver import fingerprint, read_only_commands
from tests.hostile.images import get_field, put_field
from tests.qemu import create, qemu_io


@pytest.fixture
def chain_dir(tmp_path, qemu):
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\xaa" * (1 << 20))
    mid = str(tmp_path / "mid.qcow2")
    create(mid, "1M", cluster_size="16k", backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -P 0x11 0 16k", "write -c -P 0x12 64k 16k")
    top = str(tmp_path / "top.qcow2")
    create(top, "1M", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x22 1k 2k", "write -z 32k 4k", "discard 128k 64k")
    return tmp_path, top


@pytest.mark.parametrize("flags", ["clean", "dirty", "corrupt", "autoclear"])
def test_read_only_commands_change_nothing(chain_dir, flags):
    d, top = chain_dir
    if flags == "dirty":
        put_field(top, "incompatible_features", get_field(top, "incompatible_features") | 1)
    elif flags == "corrupt":
        put_field(top, "incompatible_features", get_field(top, "incompatible_features") | 2)
    elif flags == "autoclear":
        put_field(top, "autoclear_features", 1 << 40)
    past = 1_000_000_000  # mtimes in 2001: a rewrite of the same bytes would still show
    for name in os.listdir(d):
        os.utime(d / name, (past, past))
    before = fingerprint(str(d))
    ran = set()
    for argv in read_only_commands(top, has_backing=True):
        res = qd(*argv)
        assert res["rc"] in (0, 1, 2, 3), argv
        ran.add(argv[0])
    assert fingerprint(str(d)) == before
    assert {"info", "map", "read"} <= ran
