"""pip users get the compiled engine: `pip install .` builds a wheel that carries it, and a fresh
venv that installs that wheel runs it; without a C compiler the wheel is pure Python and works,
and `python -m qdebug.native build` then compiles from site-packages.

About two minutes (two wheel builds, two venvs): `make test-packaging`, and always in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.packaging

if os.environ.get("CI") != "true" and os.environ.get("QDEBUG_PACKAGING_TEST") != "1":
    pytest.skip("builds wheels and venvs (~2 minutes): make test-packaging, or CI=true", allow_module_level=True)


def run(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, f"{args}: {p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def build_wheel(out: Path, env=None) -> Path:
    p = run(sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", out, ROOT, env=env)
    assert "project.license" not in p.stdout + p.stderr  # no deprecated license table (setuptools >= 77)
    (wheel,) = out.glob("qdebug-*.whl")
    return wheel


def venv_with(wheel: Path, where: Path, *extra: str) -> Path:
    run(sys.executable, "-m", "venv", where)
    py = where / "bin" / "python"
    run(py, "-m", "pip", "install", "--quiet", wheel, *extra)
    return py


def works(py: Path, tmp: Path) -> str:
    """The installed qdebug creates an image and replays a trace; -> its --version line."""
    image, trace = tmp / "a.qcow2", tmp / "t.trace"
    trace.write_text("write -P 0x11 0 64k\nwritev -P 0x22 64k 512 512\nread -P 0x11 0 64k\n")
    qdebug = py.parent / "qdebug"
    run(qdebug, "create", "-q", image, "4M", cwd="/")
    run(qdebug, "replay", image, trace, cwd="/")
    assert '"$schema"' in run(qdebug, "schema", "step-log", cwd="/").stdout  # the schemas are package data
    return run(qdebug, "--version", cwd="/").stdout


def test_the_wheel_carries_the_compiled_engine_and_a_fresh_venv_runs_it(tmp_path):
    wheel = build_wheel(tmp_path / "wheels")
    assert "-cp3" in wheel.name and "linux" in wheel.name  # a platform wheel: it holds extensions
    names = zipfile.ZipFile(wheel).namelist()
    assert "qdebug/_native/manifest.json" in names and any(n.endswith(".so") for n in names)
    assert "qdebug/schemas/step-log.schema.json" in names and "qdebug/tui/qdebug.tcss" in names
    py = venv_with(wheel, tmp_path / "venv")
    assert "compiled engine" in works(py, tmp_path)
    modules = run(py, "-c", "import qdebug.engine.write.datapath as d, qdebug.trace.commands as c; "
                            "print(d.__file__, c.__file__)", cwd="/").stdout.split()
    assert all(m.endswith(".so") and "site-packages" in m for m in modules)


def test_without_a_compiler_the_wheel_is_pure_python_and_compiles_after_install(tmp_path):
    wheel = build_wheel(tmp_path / "wheels", env={"CC": "false"})  # every C compile fails
    assert wheel.name.endswith("-py3-none-any.whl")
    assert not any(n.startswith("qdebug/_native/") for n in zipfile.ZipFile(wheel).namelist())
    py = venv_with(wheel, tmp_path / "venv", "mypy==2.4.1", "setuptools>=77")
    assert "pure Python engine (not compiled" in works(py, tmp_path)
    p = run(py, "-m", "qdebug.native", "build", cwd="/")  # from site-packages, where mypy sees other modules
    assert "compiling the write engine" in p.stderr and "done" in p.stderr
    assert "compiled engine" in works(py, tmp_path)
