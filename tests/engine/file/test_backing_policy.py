"""Backing files an image may not make qdebug open (OpenStack's qcow2 advisories): devices, FIFOs,
/proc and /sys always (unless --allow-backing names them), and for untrusted images anything
outside the image's directory tree; symlinks are resolved before deciding. `info`, `check` and
`layout` flag backing paths that leave the directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qdebug.engine.errors import BackingError
from qdebug.engine.file.chain import BackingPolicy, BackingRefused, open_chain
from tests.qemu import qemu_img, qemu_io

pytestmark = pytest.mark.qemu


def qd(*args, env=None):
    e = dict(os.environ)
    e.pop("QDEBUG_UNTRUSTED", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "qdebug.cli", *map(str, args)], capture_output=True, text=True,
                          env=e)


@pytest.fixture
def tree(tmp_path):
    """images/disk.qcow2 and outside/secret.raw (a "host file" holding a secret)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.raw"
    secret.write_bytes(b"SECRET host data" * 4096)
    return tmp_path


def _image(tree, backing: str, fmt: str = "raw") -> str:
    """The image naming `backing` (qemu-img -u: QEMU itself must not open a FIFO or a device)."""
    path = str(tree / "images" / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-u", "-b", backing, "-F", fmt, path, "64k")
    return path


def test_absolute_and_dotdot_paths_are_followed_for_trusted_images_only(qemu, tree):
    for name in (str(tree / "outside" / "secret.raw"), "../outside/secret.raw"):
        path = _image(tree, name)
        r = qd("read", path, "0", "16")
        assert r.returncode == 0 and r.stdout == "SECRET host data"  # a user's own chain: as qemu-io does
        r = qd("read", path, "0", "16", "--untrusted")
        assert r.returncode == 1 and "outside the image's directory" in r.stderr and "SECRET" not in r.stdout
        r = qd("read", path, "0", "16", env={"QDEBUG_UNTRUSTED": "1"})
        assert r.returncode == 1 and "outside the image's directory" in r.stderr
        r = qd("read", path, "0", "16", "--untrusted", "--backing-dir", tree / "outside")
        assert r.returncode == 0 and r.stdout == "SECRET host data"
        os.unlink(path)


def test_symlink_inside_the_tree_pointing_out_is_resolved_first(qemu, tree):
    os.symlink(tree / "outside" / "secret.raw", tree / "images" / "base.raw")
    path = _image(tree, "base.raw")
    r = qd("read", path, "0", "16", "--untrusted")
    assert r.returncode == 1 and "secret.raw" in r.stderr and "outside" in r.stderr
    r = qd("read", path, "0", "16", "--untrusted", "--allow-backing", tree / "outside" / "secret.raw")
    assert r.returncode == 0 and r.stdout == "SECRET host data"
    # a symlink to a file inside the tree is fine
    os.unlink(tree / "images" / "base.raw")
    (tree / "images" / "real.raw").write_bytes(b"inside" * 100)
    os.symlink("real.raw", tree / "images" / "base.raw")
    assert qd("read", path, "0", "6", "--untrusted").stdout == "inside"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/proc/self/environ", "/sys/kernel/mm/transparent_hugepage/enabled"])
def test_devices_and_pseudo_files_are_never_backing_files(qemu, tree, device):
    if not os.path.exists(device):
        pytest.skip(f"{device} missing here")
    path = _image(tree, device)
    for extra in ((), ("--untrusted",)):
        r = qd("read", path, "0", "16", *extra)
        assert r.returncode == 1 and "refusing to read it" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    if device.startswith("/dev/"):  # allowed by name, a character device still cannot be a disk
        r = qd("read", path, "0", "16", "--allow-backing", device)
        assert r.returncode == 1 and "not a regular file or block device" in r.stderr


def test_a_fifo_is_never_opened(qemu, tree):
    os.mkfifo(tree / "images" / "pipe")
    path = _image(tree, "pipe")
    r = qd("read", path, "0", "16")  # would hang if the FIFO were opened
    assert r.returncode == 1 and "FIFO" in r.stderr


def test_policy_in_the_engine(qemu, tree):
    path = _image(tree, "../outside/secret.raw")
    with open_chain(path, policy=BackingPolicy()) as chain:
        assert len(chain.layers) == 2
    with pytest.raises(BackingRefused) as e:
        open_chain(path, policy=BackingPolicy(confine=True))
    assert e.value.path == str(tree / "outside" / "secret.raw")
    assert isinstance(e.value, BackingError)
    with open_chain(path, policy=BackingPolicy(confine=True, dirs=(str(tree / "outside"),))) as chain:
        assert len(chain.layers) == 2


def test_info_check_layout_flag_backing_paths_that_leave_the_directory(qemu, tree):
    path = _image(tree, "../outside/secret.raw")
    for cmd in (["info"], ["check"], ["layout"]):
        r = qd(*cmd, path)
        text = r.stdout + r.stderr
        assert "outside the image's directory" in text and "secret.raw" in text, (cmd, text)
    j = json.loads(qd("info", "--output=json", path).stdout)
    assert any("outside the image's directory" in w for w in j["qdebug"]["warnings"])
    j = json.loads(qd("check", "--output=json", path).stdout)
    assert any(f["kind"] == "backing-outside-directory" for f in j["findings"])
    inside = tree / "images" / "base.raw"
    inside.write_bytes(bytes(65536))
    os.unlink(path)
    path = _image(tree, "base.raw")
    for cmd in (["info"], ["check"], ["layout"]):
        r = qd(*cmd, path)
        assert "outside the image's directory" not in r.stdout + r.stderr
    qemu_io(path, "write -q 0 4k")
