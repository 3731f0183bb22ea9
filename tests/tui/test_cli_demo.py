"""`qdebug demo --build-only`, `qdebug tui` / `qdebug IMAGE` entry points, and the demo against QEMU."""

from __future__ import annotations

import json
import os

import pytest

from qdebug import cli
from qdebug.demo import INVALID_CLUSTER, INVALID_SUBCLUSTER, build_demo
from qdebug.engine.read.guest import read_guest
from tests.qemu import qemu_img, qemu_io


def test_build_only_prints_the_paths(tmp_path, capsys):
    assert cli.main(["demo", "--build-only", str(tmp_path / "d")]) == 0
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(out) == {"image", "backing", "trace"}
    assert all(os.path.exists(p) for p in out.values())


def test_image_shorthand_and_tui_open_the_app(tmp_path, monkeypatch):
    paths = build_demo(str(tmp_path / "d"))
    opened = []

    def fake_run(self, *a, **kw):
        opened.append((self.image_path, self.bench.trace_path, self.bench.write))

    monkeypatch.setattr("qdebug.tui.app.QDebugApp.run", fake_run)
    monkeypatch.setattr("qdebug.cli.conventions.require_terminal", lambda what: None)  # pytest has no terminal
    assert cli.main([paths["image"], "--trace", paths["trace"]]) == 0
    assert cli.main(["tui", paths["image"], "--write"]) == 0
    assert opened == [(paths["image"], paths["trace"], False), (paths["image"], None, True)]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("qdebug.cli.conventions.require_terminal", lambda what: None)  # pytest has no terminal
    assert cli.main(["tui", str(tmp_path / "missing.qcow2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qdebug: error: ") and "no such file" in err and err.count("\n") == 1
    paths = build_demo(str(tmp_path / "d"))
    bad = tmp_path / "bad.trace"
    bad.write_text("write -P 0x11 0 4k\nwrite oops\n")
    opened = []
    monkeypatch.setattr("qdebug.tui.app.QDebugApp.run", lambda self, *a, **kw: opened.append(self))
    # a trace with a line that cannot be replayed opens anyway (the line is marked in the app)
    assert cli.main(["tui", paths["image"], "--trace", str(bad)]) == 0
    assert [(t.lineno, bool(t.problem)) for t in opened[0].bench.listing] == [(1, False), (2, True)]
    assert len(opened[0].bench.commands) == 1
    keymap = tmp_path / "keys"
    keymap.write_text("step.next\n")
    assert cli.main(["tui", paths["image"], "--keymap", str(keymap)]) == 1
    assert "expected 'binding-id = keys'" in capsys.readouterr().err
    keymap.write_text("# my keys\nstep.next = j\nstep.nxet = k\n")  # a typo is an error naming its line
    assert cli.main(["tui", paths["image"], "--keymap", str(keymap)]) == 1
    err = capsys.readouterr().err
    assert f"{keymap}:3: unknown binding id 'step.nxet'" in err and err.count("\n") == 1
    keymap.write_text("step.next = j\nview.host = H\nquit.save = w\n")  # ids of views and screens are known
    assert cli.main(["tui", paths["image"], "--keymap", str(keymap)]) == 0
    assert opened[-1]._keymap["quit.save"] == "w"


def test_demo_image_is_what_qemu_sees(tmp_path, qemu):
    """QEMU finds exactly the one poked invalid entry, and reads the rest as the demo wrote it."""
    paths = build_demo(str(tmp_path / "d"))
    p = qemu_img("check", "--output=json", paths["image"], check=False)
    report = json.loads(p.stdout)
    assert p.returncode == 2 and report["corruptions"] == 1 and report.get("leaks", 0) == 0
    qemu_io(paths["image"], "read -P 0xb0 0 1M", "read -P 0 1M 64k", "read -P 0x22 0x208000 4k",
            "read -P 0xb1 0x210000 64k")
    bad = INVALID_CLUSTER * 65536 + INVALID_SUBCLUSTER * 2048
    r = qemu_io(paths["image"], f"read 0x{bad:x} 2k", check=False)
    assert b"Input/output error" in r.stdout + r.stderr


# Guest ranges the demo trace touches (cluster 48, the invalid one, is not among them).
TOUCHED = [(0, 0x30000), (0x80000, 0x20000), (0x100000, 0x10000), (0x140000, 0x10000), (0x200000, 0x10000),
           (0x400000, 0x10000)]


def qemu_bytes(image: str) -> bytes:
    """The TOUCHED ranges as QEMU reads them (qemu-io read -v: convert stops at the invalid entry)."""
    out = qemu_io(image, *(f"read -v 0x{o:x} 0x{n:x}" for o, n in TOUCHED)).stdout.decode()
    data = bytearray()
    for line in out.splitlines():
        head, sep, rest = line.partition(":  ")
        if sep and len(head) == 8:
            data += bytes.fromhex(rest[:48])
    return bytes(data)


@pytest.mark.parametrize("step", [1, 2, 5, 7, 9])
def test_demo_trace_replays_like_qemu(tmp_path, qemu, step):
    """After the first `step` trace commands, the app's scratch image reads as QEMU's does."""
    import asyncio
    import shutil

    from qdebug.tui.app import make_app

    paths = build_demo(str(tmp_path / "d"))
    ref = str(tmp_path / "d" / "ref.qcow2")
    shutil.copyfile(paths["image"], ref)
    lines = [ln for ln in open(paths["trace"]).read().splitlines() if ln and not ln.startswith("#")]
    qemu_io(ref, *lines[:step])

    async def run() -> bytes:
        app = make_app(paths["image"], trace=paths["trace"], counts=False)
        async with app.run_test(size=(120, 40)) as pilot:
            app.goto(("step", step))
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.bench.position == step
            return b"".join(read_guest(app.chain, o, n) for o, n in TOUCHED)

    assert asyncio.run(run()) == qemu_bytes(ref)
