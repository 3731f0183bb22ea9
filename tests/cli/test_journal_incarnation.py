"""An undo journal left beside a path whose image was re-created or replaced (`qemu-img create`
over it, `cp` or `mv` of another image over it) is recognised as another incarnation's: `replay`
and `undo` refuse it in one line with the exact fix, exit 1, and leave the image untouched. A
foreign write into the same image keeps its own message; an image moved or copied together with
its journal still undoes; a version 2 journal (no identity) still works."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from qdebug.engine.file.image import open_image
from qdebug.engine.file.journal import Journal, journal_path
from tests.cli.test_write_cli import digest, qdebug, write_trace
from tests.qemu import QEMU_IMG, convert_raw, create, qemu_io

STALE = b"belongs to another incarnation of the file"


@pytest.fixture
def journaled(tmp_path, qemu):
    """An image with a committed undo journal of two steps that grew the file."""
    image = create(str(tmp_path / "a.qcow2"), "4M")
    trace = write_trace(tmp_path / "t.trace", ["write -P 0x11 0 64k", "write -P 0x22 1M 64k"])
    assert qdebug("replay", "--journal", image, trace).returncode == 0
    assert os.path.exists(journal_path(image))
    return image


def refused_as_stale(image: str, tmp_path, why: bytes) -> None:
    """replay (journaled and not) and undo refuse with the fix; the image is untouched; the fix works."""
    before = digest(image)
    trace = write_trace(tmp_path / "next.trace", ["write -P 0x33 0 4k"])
    for args in (("replay", image, trace), ("replay", "--journal", image, trace), ("undo", image),
                 ("undo", "--all", image)):
        p = qdebug(*args)
        err = p.stderr.decode()
        assert p.returncode == 1, (args, err)
        assert STALE in p.stderr and why in p.stderr, (args, err)
        assert f"Fix: `qdebug undo --discard-journal {image}`" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert b"changed after its undo journal" not in p.stderr
        assert digest(image) == before
    assert qdebug("undo", "--discard-journal", image).returncode == 0
    assert not os.path.exists(journal_path(image))
    assert qdebug("replay", "--journal", image, trace).returncode == 0


def test_qemu_img_create_over_it_same_options(journaled, tmp_path):
    """The very same header: only the length (shorter than the journal's last step left it) tells."""
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", journaled, "4M"], check=True)
    refused_as_stale(journaled, tmp_path, b"shorter than the")


def test_qemu_img_create_over_it_other_options(journaled, tmp_path):
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", journaled, "8M"], check=True)
    refused_as_stale(journaled, tmp_path, b"its qcow2 header says size 8388608 (the journal's: 4194304)")


def test_cp_of_another_image_over_it(journaled, tmp_path):
    other = create(str(tmp_path / "other.qcow2"), "4M", cluster_size="128k")
    qemu_io(other, "write -P 0x44 0 3M")  # longer than the journaled image
    shutil.copyfile(other, journaled)
    refused_as_stale(journaled, tmp_path, b"cluster_bits 17 (the journal's: 16)")


def test_mv_of_another_image_over_it(journaled, tmp_path):
    """Same options, longer: only the inode tells."""
    other = create(str(tmp_path / "other.qcow2"), "4M")
    qemu_io(other, "write -P 0x44 0 3M")
    os.replace(other, journaled)
    refused_as_stale(journaled, tmp_path, b"it is another file (inode")


def test_an_interrupted_step_of_another_incarnation_is_refused_before_any_rollback(tmp_path, qemu):
    image = create(str(tmp_path / "a.qcow2"), "4M")
    img = open_image(image, writable=True)
    j = Journal(img, durable=True)
    j.begin({"command": "cut short"})
    img.pwrite(img.file_size + 512, b"\x23" * 65536)
    os.close(j.fd)  # "killed": no rollback, no commit
    img.close()
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image, "4M"], check=True)
    before = digest(image)
    for args in (("replay", image, "-c", "flush"), ("undo", image)):
        p = qdebug(*args)
        assert p.returncode == 1 and STALE in p.stderr and b"cluster_bits 12 (the journal's: 16)" in p.stderr, p.stderr
        assert digest(image) == before


def test_a_foreign_write_keeps_its_own_message(journaled, tmp_path):
    qemu_io(journaled, "write -P 0x55 2M 64k")
    before = digest(journaled)
    p = qdebug("undo", journaled)
    assert p.returncode == 1 and b"changed after its undo journal was written" in p.stderr
    assert STALE not in p.stderr and digest(journaled) == before


def test_an_image_moved_or_copied_with_its_journal_still_undoes(journaled, tmp_path, qemu):
    """Another inode, but exactly what the journal's last step left (cp -p keeps the mtime)."""
    fresh = convert_raw(create(str(tmp_path / "fresh.qcow2"), "4M"), str(tmp_path / "fresh.raw"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = str(elsewhere / "a.qcow2")
    subprocess.run(["cp", "-p", journaled, journal_path(journaled), str(elsewhere)], check=True)
    assert os.stat(moved).st_ino != os.stat(journaled).st_ino
    assert qdebug("undo", "--all", moved).returncode == 0
    assert convert_raw(moved, str(tmp_path / "moved.raw")) == fresh


def test_a_version_2_journal_without_identity_still_undoes(journaled, tmp_path, qemu):
    """Journals written before identities: version 2, the same records right after the file header."""
    jpath = journal_path(journaled)
    with open(jpath, "rb") as f:
        data = f.read()
    magic, version, block = struct.unpack(">8sII", data[:16])
    assert (magic, version) == (b"QDBGJRNL", 3)
    n, _crc = struct.unpack(">II", data[16:24])
    with open(jpath, "r+b") as f:
        f.write(struct.pack(">8sII", magic, 2, block) + data[24 + n:])
        f.truncate()
    fresh = convert_raw(create(str(tmp_path / "fresh.qcow2"), "4M"), str(tmp_path / "fresh.raw"))
    p = qdebug("undo", "--all", journaled)
    assert p.returncode == 0, p.stderr
    assert convert_raw(journaled, str(tmp_path / "undone.raw")) == fresh
