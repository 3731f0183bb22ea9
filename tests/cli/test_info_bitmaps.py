"""Persistent dirty bitmaps in `qdebug info` against `qemu-img info` 7.2, byte for byte: the
"bitmaps:" block of the text and format-specific.data.bitmaps of --output=json (flags in QEMU's
order, an empty flag list as QEMU lays it out, names escaped as QEMU escapes them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.qemu import QEMU_IMG, QEMU_IO, create, qemu_img, qemu_io


def both(path: str, *extra: str) -> tuple[str, str]:
    q = subprocess.run([QEMU_IMG, "info", *extra, path], capture_output=True, text=True, check=True).stdout
    d = subprocess.run([sys.executable, "-m", "qdebug.cli", "info", *extra, path], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert d.returncode == 0, d.stderr
    out = d.stdout
    if out.startswith("{"):  # qdebug's key is the last one: cut it off as text, keep the rest as printed
        out = out[:out.index(',\n    "qdebug": ')] + "\n}\n"
    else:
        out = out[:out.index("qdebug:\n")]
    if not extra:  # qdebug's text never carries a terminal control character from an image's name
        q = q.replace("\x7f", "\\x7f").replace("\x01", "\\x01")
    return q, out


def killed_writer(path: str) -> None:
    """A qemu-io that opened the image for writing and died: its bitmaps stay marked in use."""
    p = subprocess.Popen([QEMU_IO, "-f", "qcow2", "-c", "sleep 60000", path], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        seen = -1
        while time.monotonic() < deadline:
            # QEMU rewrites the bitmap directory with the autoclear bit cleared first: killed in
            # that window the image shows no bitmaps at all. Wait until the count holds still.
            n = qemu_img("info", "--output=json", "-U", path).stdout.count(b'"in-use"')
            if n and n == seen:
                time.sleep(0.3)  # (qemu-io is past its open and sleeping)
                break
            seen = n
            time.sleep(0.05)
        else:
            raise AssertionError("qemu-io did not mark the bitmaps in use")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


@pytest.mark.parametrize("extended_l2", [True, False])
def test_bitmaps_are_qemu_imgs(tmp_path, qemu, extended_l2):
    path = create(str(tmp_path / "b.qcow2"), "16M", extended_l2=extended_l2)
    qemu_img("bitmap", "--add", path, "bm1")
    qemu_img("bitmap", "--add", "-g", "512k", path, "b m2")
    qemu_img("bitmap", "--add", "--disable", "-g", "4k", path, "off3")
    qemu_img("bitmap", "--add", "-g", "2G", path, "a\x7fb\x01c\U0001F600/\"\\u00e9é")
    qemu_img("bitmap", "--disable", path, "bm1")
    qemu_img("bitmap", "--enable", path, "off3")
    qemu_io(path, "write -P 1 0 1M")
    for extra in ((), ("--output=json",)):
        q, d = both(path, *extra)
        assert "bitmaps:" in q or '"bitmaps": [' in q
        assert d == q
    killed_writer(path)
    for extra in ((), ("--output=json",)):
        q, d = both(path, *extra)
        assert "in-use" in q
        assert d == q


def test_no_bitmaps_key_without_bitmaps_or_with_the_autoclear_bit_cleared(tmp_path, qemu):
    path = create(str(tmp_path / "b.qcow2"), "4M")
    qemu_img("bitmap", "--add", path, "gone")
    qemu_img("bitmap", "--remove", path, "gone")
    for extra in ((), ("--output=json",)):
        q, d = both(path, *extra)
        assert "bitmaps:" not in q and "\"bitmaps\"" not in q and d == q
    qemu_img("bitmap", "--add", path, "hidden")
    with open(path, "r+b") as f:  # autoclear bit 0 cleared: QEMU ignores the extension
        f.seek(95)
        f.write(b"\0")
    for extra in ((), ("--output=json",)):
        q, d = both(path, *extra)
        assert "hidden" not in q and d == q
