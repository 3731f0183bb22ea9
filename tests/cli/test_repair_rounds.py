"""`qdebug repair` past the findings a check lists per kind (10,000): it goes on in rounds, one
journal step each, until none is left, and says how many steps undo it."""

from __future__ import annotations

import struct

from qdebug.engine.file.image import open_image
from tests.qemu import create, qemu_check, qemu_io


def test_repair_goes_on_past_the_listing_cap(tmp_path, qemu, monkeypatch, capsys):
    from qdebug.cli.main import main
    from qdebug.engine.check import checker

    monkeypatch.setattr(checker, "MAX_FINDINGS_PER_KIND", 2)  # as if the image had tens of thousands
    img = create(str(tmp_path / "a.qcow2"), "64M")
    qemu_io(img, *(f"write -q -P 0x{i + 1:02x} {i * 65536} 64k" for i in range(7)))
    with open_image(img) as image:
        l2 = image.l2_offset(0)
    with open(img, "r+b") as f:  # subcluster 3 of 7 clusters: both allocated and zero (invalid)
        for i in range(7):
            f.seek(l2 + 16 * i + 8)
            (bm,) = struct.unpack(">Q", f.read(8))
            f.seek(l2 + 16 * i + 8)
            f.write(struct.pack(">Q", bm | 1 << 35))
    assert main(["check", img]) == 2
    capsys.readouterr()
    assert main(["repair", img]) == 0
    out = capsys.readouterr().out
    assert "5 more findings past the first 2 of their kind" in out
    assert "in 4 rounds, journal steps 1-4; `qdebug undo --steps 4" in out
    assert "Checked again: no errors were found on the image." in out
    assert qemu_check(img)[0] == 0
    for i in range(7):  # keep-data: the data is there
        qemu_io(img, f"read -q -P 0x{i + 1:02x} {i * 65536} 64k")
