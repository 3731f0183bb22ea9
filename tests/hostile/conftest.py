"""Helpers for the hostile-input tests: QEMU-made images to break, and qdebug run in-process under
the fuzz driver's guards (timeout, captured output), judged by the same rules as the fuzzer."""

from __future__ import annotations

import os

import pytest

from tests.hostile.driver import run_command, violations
from tests.qemu import IN_CI, create, qemu_io

@pytest.fixture
def tmpfs(tmp_path, qemu):
    """mount(size) -> the path of a new real tmpfs of `size` ("6m"), unmounted after the test.
    Needs root (CI runs as root: there a missing root fails, never skips)."""
    import subprocess

    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root: the tmpfs tests must run")
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: str) -> str:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        mounted.append(mnt)
        return str(mnt)

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


READ_ONLY = [["info"], ["info", "--output=json"], ["map", "--wide"], ["map", "--output=json"], ["map", "--subclusters"]]


def qd(*argv: str, timeout: float = 20.0) -> dict:
    """Run `qdebug ARGV` in this process; fails the test on any broken rule (traceback, hang...)."""
    res = run_command([str(a) for a in argv], timeout)
    bad = violations(res, timeout)
    assert not bad, f"qdebug {' '.join(map(str, argv))}: {bad}\n{res['stderr']}"
    return res


def error_line(res: dict) -> str:
    assert res["rc"] == 1, f"expected an error, got exit {res['rc']}: {res['stderr']}"
    return res["stderr"].strip().splitlines()[-1]


def one_error(img, *needles: str, commands=READ_ONLY) -> str:
    """Every read-only command refuses `img` with one error line containing every needle; except
    `info` about a backing chain it cannot open: qemu-img info opens the image alone (exit 0), so
    qdebug's info prints it and says in one warning line why the chain is left out."""
    line = ""
    for cmd in commands:
        res = qd(*cmd, img)
        if cmd[0] == "info" and res["rc"] == 0:
            why = [ln for ln in res["stderr"].splitlines()
                   if ln.startswith("qdebug: warning:") and ln.endswith("describes this image alone")]
            assert len(why) == 1 and "\x1b" not in res["stderr"], res["stderr"]
            text = why[0]
        else:
            line = text = error_line(res)
        for n in needles:
            assert n.lower() in text.lower(), f"{cmd}: {n!r} not in {text!r}"
    return line


def all_ok(img, *extra: str) -> None:
    for cmd in READ_ONLY:
        res = qd(*cmd, *extra, img)
        assert res["rc"] == 0, res["stderr"]


@pytest.fixture
def img64(tmp_path, qemu) -> str:
    """64 KiB clusters, extended L2: data, zero, unallocated-alloc and two compressed clusters."""
    path = str(tmp_path / "img.qcow2")
    create(path, "4M")
    qemu_io(path, "write -P 0x11 0 2k", "write -P 0x14 128k 64k", "write -z 132k 8k",
            "write -c -P 0x18 384k 64k", "write -c -P 0x19 448k 64k")
    return path


@pytest.fixture
def zstd16(tmp_path, qemu) -> str:
    path = str(tmp_path / "zstd.qcow2")
    create(path, "1M", cluster_size="16k", compression_type="zstd")
    qemu_io(path, "write -c -P 0x21 0 16k", "write -P 0x22 16k 16k")
    return path


def file_size(path) -> int:
    return os.stat(path).st_size
