"""The write engine's hot modules compiled by mypyc: the same Python source, about twice as fast.

Planning a command exactly as QEMU does is ~40 small functions of integer and dict work per
command; CPython's interpreter overhead is most of its cost. mypyc compiles those modules (typed
Python, nothing hand-written in C) into extensions kept apart from the source, in `_native/`
beside this file, with a manifest of the sources they were built from. `enable()` (called when
`qdebug.engine` is imported) puts them first on the engine package's path only if every source
still matches its hash, so an edited module is never shadowed by a stale build: the pure Python
modules are the reference and the fallback (`QDEBUG_NATIVE=0` forces them).

`python -m qdebug.native build` (run by `make install`, and by the wheel build of `pip install .`,
see build_hooks/) builds them; without mypy or a C compiler it says so and qdebug runs as pure
Python. It works from an installed copy too (site-packages), if that is writable.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
OUT = PACKAGE / "_native"
MANIFEST = OUT / "manifest.json"
# The modules a command's parsing, planning and writing run through (leaves first). Others
# (header, image, chain, check...) are dominated by numpy and system calls: compiling them gains
# nothing. Compiled modules and pure ones must not mix (a compiled caller expects the compiled
# class), so either all of these load compiled or none does.
MODULES = ("engine.format.constants", "engine.format.subclusters", "engine.format.geometry", "engine.write.blocklayer",
           "trace.syntax", "engine.write.ops", "trace.qemuio", "trace.commands", "engine.write.plan",
           "engine.write.txn", "engine.write.allocator", "engine.read.kinds", "engine.read.guestview",
           "engine.write.minimal_cow", "engine.write.step", "engine.write.cost", "engine.write.context",
           "engine.write.datapath", "engine.write.zeroes", "engine.write.discard", "engine.write.compressed",
           "engine.write.writer")
GROUP = "qdebug_engine"

_usable: bool | None = None  # the build matches the sources (checked once per process)


def _source(module: str, package: Path = PACKAGE) -> Path:
    return package.joinpath(*module.split(".")).with_suffix(".py")


# Pure modules whose classes the compiled ones use: mypyc builds their attribute types into the
# extension (Image.mapping's type is checked at run time), so a change there needs a new build too.
TYPED_BY = ("engine.file.image", "engine.file.filemap", "engine.file.chain", "engine.format.header")


def _fingerprint(package: Path = PACKAGE) -> dict:
    return {"python": sys.implementation.cache_tag, "abi": sys.abiflags,
            "sources": {m: hashlib.sha256(_source(m, package).read_bytes()).hexdigest()
                        for m in (*MODULES, *TYPED_BY)}}


def up_to_date() -> bool:
    try:
        return json.loads(MANIFEST.read_text()) == _fingerprint()
    except (OSError, ValueError):
        return False


def active() -> bool:
    """The compiled modules are the ones imported in this process."""
    return bool(_usable)


def enable(package: str, package_path: list[str]) -> None:
    """Called by the packages that hold compiled modules (qdebug.engine.write, qdebug.trace...) as they
    are imported: their compiled modules come first on the package's path when they were built from
    exactly these sources. `package` is dotted below qdebug ("engine.write")."""
    global _usable
    if _usable is None:
        _usable = os.environ.get("QDEBUG_NATIVE", "1") != "0" and up_to_date()
        if _usable:
            sys.path.append(str(OUT))  # the group's shared library is a top-level module
    if _usable:
        package_path.insert(0, str(OUT.joinpath("qdebug", *package.split("."))))


class _Meter:
    """One line on stderr while the build runs: what it is doing, the C files compiled so far
    (rewritten in place on a terminal; elsewhere the line is finished when the build is)."""

    def __init__(self, show: bool):
        self.show, self.tty = show, sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.say("qdebug: compiling the write engine (about a minute, once)\u2026", first=True)

    def say(self, text: str, *, first: bool = False) -> None:
        if not self.show:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[K" + text)
        elif first:
            sys.stderr.write(text)
        sys.stderr.flush()
        self.text = text

    def step(self, what: str) -> None:
        if self.tty:
            self.say(f"qdebug: compiling the write engine (about a minute, once)\u2026 {what}")

    def end(self, result: str) -> None:
        if not self.show:
            return
        took = f"{time.monotonic() - self.t0:.0f} s"
        sys.stderr.write(("\r\x1b[K" + self.text if self.tty else "") + f" {result} ({took})\n")
        sys.stderr.flush()


def compile_into(package: Path = PACKAGE, out: Path = OUT, *, show: bool = True) -> bool:
    """Compile MODULES of the qdebug package at `package` into `out` with its manifest.

    The sources are compiled from a copy in a temporary directory: mypy run where the package is
    installed (site-packages) would also see every module installed beside it, and refuses
    files such as typing_extensions.py that shadow its own library. False (and why, on stderr)
    when mypyc, a C compiler or Python's headers are missing: qdebug then runs as pure Python."""
    import shutil
    import subprocess
    import tempfile

    try:
        import mypyc  # noqa: F401
    except ImportError:
        shutil.rmtree(out, ignore_errors=True)
        if show:
            print("qdebug native: mypy (mypyc) is not installed: the engine runs as pure Python", file=sys.stderr)
        return False
    shutil.rmtree(out, ignore_errors=True)  # whatever happens, no build of other sources stays
    meter = _Meter(show)
    with tempfile.TemporaryDirectory(prefix="qdebug-native-") as tmp:
        root = Path(tmp) / "src"
        shutil.copytree(package, root / "qdebug", ignore=shutil.ignore_patterns("_native", "__pycache__", "*.so"))
        sources = [str(_source(m, root / "qdebug").relative_to(root)) for m in MODULES] + [
            "--ignore-missing-imports", "--follow-imports=silent", "--check-untyped-defs"]
        cdir = Path(tmp) / "c"
        setup = Path(tmp) / "setup.py"
        setup.write_text(
            "import sys\nfrom setuptools import setup\nfrom mypyc.build import mypycify\n"
            f"setup(name='qdebug-native', ext_modules=mypycify({sources!r}, opt_level='3', "
            f"group_name={GROUP!r}, target_dir={str(cdir)!r}))\n")
        cmd = [sys.executable, str(setup), "build_ext", "--build-lib", str(Path(tmp) / "lib"),
               "--build-temp", str(Path(tmp) / "tmp")]
        meter.step("type-checking and generating C")
        p = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "MYPY_FORCE_COLOR": "0"})
        assert p.stdout is not None
        log: list[str] = []
        total = done = 0
        for line in p.stdout:
            log.append(line)
            if line.startswith("building '") and not total:
                total = len(list(cdir.rglob("*.c")))
            elif " -c " in line and ".c " in line:
                done += 1
                meter.step(f"C {done}/{max(total, done)}")
        if p.wait() != 0:
            meter.end("failed")
            tail = "".join(log).strip().splitlines()[-15:]
            print("qdebug native: the mypyc build failed; the engine runs as pure Python:\n  " + "\n  ".join(tail),
                  file=sys.stderr)
            return False
        shutil.copytree(Path(tmp) / "lib", out)
    (out / "manifest.json").write_text(json.dumps(_fingerprint(package)))
    meter.end("done")
    return True


def build() -> int:
    """Compile MODULES with mypyc into _native/ (a fresh build each time; ~1 minute)."""
    return 0 if compile_into() else 1


def describe() -> str:
    """Which engine this process runs, for `qdebug --version` and `python -m qdebug.native status`."""
    import importlib

    importlib.import_module("qdebug.engine.write")  # importing the engine decides (in qdebug.native, which
    real = importlib.import_module("qdebug.native")  # is not this module when run as __main__)
    if real.active():
        return "compiled engine (mypyc)"
    if os.environ.get("QDEBUG_NATIVE", "1") == "0":
        return "pure Python engine (QDEBUG_NATIVE=0)"
    if not MANIFEST.exists():
        return "pure Python engine (not compiled: python -m qdebug.native build)"
    return "pure Python engine (the compiled build is stale: python -m qdebug.native build)"


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        if not up_to_date():
            build()  # a failed build is reported and qdebug runs as pure Python: not an error here
        sys.exit(0)
    if sys.argv[1:] == ["status"]:
        print("compiled engine:", "built, up to date" if up_to_date() else "not built, or stale")
        print("this process runs the", describe())
        sys.exit(0)
    print("usage: python -m qdebug.native build|status", file=sys.stderr)
    sys.exit(2)
