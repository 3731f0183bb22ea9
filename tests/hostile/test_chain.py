"""Hostile backing chains: loops, depth, missing files, format probing, refused names."""

from __future__ import annotations

import os

import pytest

from qdebug.engine.file.chain import MAX_CHAIN_DEPTH
from tests.hostile.conftest import all_ok, error_line, one_error, qd
from tests.hostile.images import get_field, patch, put_field
from tests.qemu import create, qemu_io


def set_backing(path: str, name: str, fmt_ext: bool = True) -> None:
    """Point `path` (made with a backing file) at `name`; drop the declared format if not fmt_ext."""
    bfo = get_field(path, "backing_file_offset")
    patch(path, bfo, name.encode())
    put_field(path, "backing_file_size", len(name.encode()))
    if not fmt_ext:
        patch(path, 112, b"\x12\x34\x56\x78")  # the backing format extension becomes an unknown one


@pytest.fixture
def pair(tmp_path, qemu):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create(b, "1M")
    qemu_io(b, "write -P 0xbb 0 64k")
    create(a, "1M", backing="b.qcow2", backing_fmt="qcow2")
    return a, b


def test_image_that_is_its_own_backing_file(pair):
    a, _b = pair
    set_backing(a, "a.qcow2")
    one_error(a, "loop")
    all_ok(a, "--no-backing")


def test_two_images_backing_each_other(pair, tmp_path):
    a, b = pair
    create(str(tmp_path / "b.qcow2"), "1M", backing="a.qcow2", backing_fmt="qcow2")
    line = one_error(a, "loop")
    assert "a.qcow2" in line


def test_loop_through_a_symlink(pair, tmp_path):
    a, _b = pair
    os.symlink("a.qcow2", tmp_path / "alias.qcow2")
    set_backing(a, "alias.qcow2")
    one_error(a, "loop")


def test_depth_limit(tmp_path, qemu):
    prev = None
    n = MAX_CHAIN_DEPTH + 2
    for i in range(n):
        path = str(tmp_path / f"l{i}.qcow2")
        create(path, "64k", cluster_size="16k", **({"backing": prev, "backing_fmt": "qcow2"} if prev else {}))
        prev = os.path.basename(path)
    one_error(str(tmp_path / f"l{n - 1}.qcow2"), "deeper than", str(MAX_CHAIN_DEPTH))
    all_ok(str(tmp_path / f"l{MAX_CHAIN_DEPTH - 1}.qcow2"))


def test_missing_backing_file_and_no_backing(pair):
    a, b = pair
    os.unlink(b)
    one_error(a, "not found", "b.qcow2", "--no-backing")
    all_ok(a, "--no-backing")
    res = qd("read", "--no-backing", a, "0", "64k")
    assert res["rc"] == 0 and res["stdout_head"] == bytes(64 << 10)  # the top alone: zeros


@pytest.mark.parametrize("name", ['json:{"driver":"file","filename":"/etc/passwd"}', "nbd://127.0.0.1:10809/x",
                                  "file:b.qcow2", "http://example.com/x.qcow2", "ssh://host/x"])
def test_json_and_protocol_names_are_refused(pair, name):
    a, _b = pair
    set_backing(a, name)
    one_error(a, "refusing to follow", "protocol or json")
    all_ok(a, "--no-backing")


def test_undeclared_format_is_probed_with_a_warning(pair, tmp_path):
    a, _b = pair
    set_backing(a, "b.qcow2", fmt_ext=False)
    res = qd("read", a, "0", "64k")
    assert res["rc"] == 0 and res["stdout_head"] == b"\xbb" * (64 << 10)
    assert "no declared format; probed as qcow2" in res["stderr"]
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\xcc" * 4096)
    set_backing(a, "r.raw", fmt_ext=False)
    res = qd("read", a, "0", "4k")
    assert res["stdout_head"] == b"\xcc" * 4096 and "probed as raw" in res["stderr"]
    info = qd("info", a)
    assert "qdebug: warning:" in info["stderr"]


def test_backing_that_is_not_a_regular_file(pair, tmp_path):
    a, _b = pair
    os.mkfifo(tmp_path / "fifo")
    set_backing(a, "fifo")
    one_error(a, "not a regular file")
    set_backing(a, "/dev/zero")
    one_error(a, "not a regular file")


def test_broken_backing_file_is_named(pair):
    a, b = pair
    put_field(b, "cluster_bits", 40)
    line = one_error(a, "backing file", "b.qcow2", "cluster_bits")


def test_names_with_newlines_and_terminal_escapes_stay_one_harmless_line(pair):
    a, _b = pair
    set_backing(a, "evil\n\x1b[2Jname")
    line = one_error(a, "\\n", "\\x1b")
    res = qd("info", "--no-backing", a)
    assert res["rc"] == 0 and b"\x1b" not in res["stdout_head"] and b"evil\\n" in res["stdout_head"]
