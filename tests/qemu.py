"""Helpers that run QEMU's qemu-img / qemu-io as the test oracle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
IN_CI = os.environ.get("CI") == "true"


def require_qemu() -> None:
    """Skip without QEMU locally; in CI a missing QEMU is a failure, never a skip."""
    if QEMU_IMG and QEMU_IO:
        return
    if IN_CI:
        pytest.fail("CI=true but qemu-img/qemu-io are missing: differential tests must run")
    pytest.skip("qemu-img/qemu-io not installed")


def run(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.decode()} {p.stdout.decode()}")
    return p


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    require_qemu()
    return run(QEMU_IMG, *args, check=check)


def qemu_io(image: str, *cmds: str, fmt: str | None = "qcow2", check: bool = True) -> subprocess.CompletedProcess:
    """One qemu-io process running `cmds` in order (one process: one allocator state)."""
    require_qemu()
    args = [QEMU_IO]
    if fmt:
        args += ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, image, check=check)
    if check and (b"failed" in p.stdout or b"failed" in p.stderr):
        raise AssertionError(f"qemu-io {cmds}: {p.stdout.decode()} {p.stderr.decode()}")
    return p


def create(path: str, size: str | int, *, cluster_size: str = "64k", extended_l2: bool = True,
           backing: str | None = None, backing_fmt: str | None = None, **opts) -> str:
    o = [f"cluster_size={cluster_size}", f"extended_l2={'on' if extended_l2 else 'off'}"]
    o += [f"{k}={v}" for k, v in opts.items()]
    args = ["create", "-q", "-f", "qcow2", "-o", ",".join(o)]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qemu_img(*args, path, str(size))
    return path


def qemu_map(path: str) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", path).stdout)


def qemu_map_text(path: str) -> str:
    return qemu_img("map", "--output=json", path).stdout.decode()


def convert_raw(path: str, out: str) -> bytes:
    qemu_img("convert", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def qemu_check(path: str) -> tuple[int, dict]:
    p = qemu_img("check", "--output=json", path, check=False)
    try:
        return p.returncode, json.loads(p.stdout)
    except json.JSONDecodeError:
        return p.returncode, {}
