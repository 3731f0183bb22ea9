"""The mypyc-compiled engine (qdebug/native.py): used only when built from exactly the current
source, and indistinguishable from the pure Python modules it is compiled from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qdebug import native
from tests.cli.test_write_cli import qdebug as qdebug_cli
from tests.cli.test_write_cli import write_trace
from tests.qemu import create
from tests.trace.random_traces import random_trace, strip_comments


def test_a_build_from_other_sources_is_not_used(tmp_path, monkeypatch):
    fake = tmp_path / "_native"
    fake.mkdir()
    monkeypatch.setattr(native, "OUT", fake)
    monkeypatch.setattr(native, "MANIFEST", fake / "manifest.json")
    assert not native.up_to_date()  # no build at all
    good = native._fingerprint()
    (fake / "manifest.json").write_text(json.dumps(good))
    assert native.up_to_date()
    stale = json.loads(json.dumps(good))
    stale["sources"]["engine.write.datapath"] = "0" * 64  # datapath.py edited since the build
    (fake / "manifest.json").write_text(json.dumps(stale))
    assert not native.up_to_date()
    (fake / "manifest.json").write_text("{not json")
    assert not native.up_to_date()


def test_compiled_modules_are_loaded_when_built():
    """In CI the build is part of `make install`: the speed the benchmarks report depends on it."""
    import qdebug.engine.write.datapath as datapath
    import qdebug.trace.commands as commands

    if os.environ.get("CI") == "true":
        assert native.up_to_date(), "make install did not build the compiled engine (see its output)"
    if native.active():
        assert datapath.__file__.endswith(".so") and commands.__file__.endswith(".so")
    else:
        assert datapath.__file__.endswith(".py")


def _replay(tmp_path, name: str, image_src: str, trace: str, pure: bool, *extra: str) -> tuple[bytes, list]:
    image = str(tmp_path / name)
    with open(image_src, "rb") as s, open(image, "wb") as d:
        d.write(s.read())
    log = str(tmp_path / f"{name}.jsonl")
    env = {**os.environ, "QDEBUG_NATIVE": "0" if pure else "1"}
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "replay", "--keep-going", "--log", log, "--log-plans", *extra,
                        image, trace],
                       capture_output=True, env=env)
    assert p.returncode in (0, 1), p.stderr.decode()[-2000:]
    steps = [json.loads(line) for line in open(log)]
    with open(image, "rb") as f:
        return f.read(), steps


@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("mode", [(), ("--dry-run",), ("--journal",)])
def test_compiled_and_pure_engines_agree(tmp_path, qemu, backing, mode):
    """Same trace, same image: the step logs (plans, host writes, bitmaps, hazards, errors) and the
    resulting files are identical byte for byte."""
    if not native.up_to_date():
        pytest.skip("the compiled engine is not built here (make install builds it)")
    size = 8 << 20
    base = None
    if backing:
        base = create(str(tmp_path / "base.qcow2"), size, cluster_size="16k")
        writes = [f"write -P 0x{i:02x} {i * 300000} 70000" for i in range(1, 20)]
        fill = qdebug_cli("replay", base, write_trace(tmp_path / "b.trace", writes))
        assert fill.returncode == 0, fill.stderr.decode()
    src = create(str(tmp_path / "src.qcow2"), size, cluster_size="16k", backing=base)
    lines = strip_comments(random_trace(7 + backing, 400, size, cluster_size=16384,
                                        mix=(("write", 35), ("unaligned", 10), ("zero", 15), ("discard", 15),
                                             ("multi", 15), ("compressed", 10))))
    trace = write_trace(tmp_path / "t.trace", lines[:200] + ["flush"] + lines[200:])
    pure = _replay(tmp_path, "pure.qcow2", src, trace, True, *mode)
    compiled = _replay(tmp_path, "compiled.qcow2", src, trace, False, *mode)
    assert len(pure[1]) == len(lines) + 1
    assert compiled[1] == pure[1]
    assert compiled[0] == pure[0]


def test_the_build_says_what_it_is_doing_on_one_line(capsys, monkeypatch):
    """Not a silent minute: one line when it starts, finished with the outcome (on a terminal the
    same line shows the phase and the C files compiled so far)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    meter = native._Meter(True)
    meter.step("C 3/18")
    meter.end("done")
    err = capsys.readouterr().err
    assert err.startswith("qdebug: compiling the write engine (about a minute, once)\u2026 done (")
    assert err.count("\n") == 1


def test_version_says_which_engine_runs():
    out = subprocess.run([sys.executable, "-m", "qdebug.cli", "--version"], capture_output=True, text=True,
                         env={**os.environ, "QDEBUG_NATIVE": "0"}).stdout
    assert out.startswith("qdebug ") and out.strip().endswith("pure Python engine (QDEBUG_NATIVE=0)")
    out = subprocess.run([sys.executable, "-m", "qdebug.cli", "--version"], capture_output=True, text=True).stdout
    assert ("compiled engine (mypyc)" in out) == native.up_to_date()
