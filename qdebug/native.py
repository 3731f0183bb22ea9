"""The write engine's hot modules compiled by mypyc: the same Python source, about twice as fast.

Planning a command exactly as QEMU does is ~40 small functions of integer and dict work per
command; CPython's interpreter overhead is most of its cost. mypyc compiles those modules (typed
Python, nothing hand-written in C) into extensions kept apart from the source, in `_native/`
beside this file, with a manifest of the sources they were built from. `enable()` (called when
`qdebug.engine` is imported) puts them first on the engine package's path only if every source
still matches its hash, so an edited module is never shadowed by a stale build: the pure Python
modules are the reference and the fallback (`QDEBUG_NATIVE=0` forces them).

`python -m qdebug.native build` (run by `make install`) builds them; without mypy or a C compiler
it says so and qdebug runs as pure Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
OUT = PACKAGE / "_native"
MANIFEST = OUT / "manifest.json"
# The modules a command's parsing, planning and writing run through (leaves first). Others
# (header, image, chain, check...) are dominated by numpy and system calls: compiling them gains
# nothing. Compiled modules and pure ones must not mix (a compiled caller expects the compiled
# class), so either all of these load compiled or none does.
MODULES = ("engine.format.constants", "engine.format.subclusters", "engine.format.geometry", "engine.write.blocklayer",
           "trace.syntax", "engine.write.ops", "trace.commands", "engine.write.plan", "engine.write.txn",
           "engine.write.allocator", "engine.read.guestview", "engine.write.step", "engine.write.context",
           "engine.write.datapath", "engine.write.zeroes", "engine.write.discard", "engine.write.compressed",
           "engine.write.writer")
GROUP = "qdebug_engine"

_usable: bool | None = None  # the build matches the sources (checked once per process)


def _source(module: str) -> Path:
    return PACKAGE.joinpath(*module.split(".")).with_suffix(".py")


# Pure modules whose classes the compiled ones use: mypyc builds their attribute types into the
# extension (Image.mapping's type is checked at run time), so a change there needs a new build too.
TYPED_BY = ("engine.file.image", "engine.file.filemap")


def _fingerprint() -> dict:
    return {"python": sys.implementation.cache_tag, "abi": sys.abiflags,
            "sources": {m: hashlib.sha256(_source(m).read_bytes()).hexdigest() for m in (*MODULES, *TYPED_BY)}}


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


def build() -> int:
    """Compile MODULES with mypyc into _native/ (a fresh build each time; ~1 minute)."""
    import shutil
    import subprocess
    import tempfile

    try:
        import mypyc  # noqa: F401
    except ImportError:
        print("qdebug native: mypy (mypyc) is not installed: the engine runs as pure Python", file=sys.stderr)
        return 0
    root = PACKAGE.parent
    sources = [str(_source(m).relative_to(root)) for m in MODULES] + [
        "--ignore-missing-imports", "--follow-imports=silent", "--check-untyped-defs"]
    with tempfile.TemporaryDirectory(prefix="qdebug-native-") as tmp:
        setup = Path(tmp) / "setup.py"
        setup.write_text(
            "import sys\nfrom setuptools import setup\nfrom mypyc.build import mypycify\n"
            f"setup(name='qdebug-native', ext_modules=mypycify({sources!r}, opt_level='3', "
            f"group_name={GROUP!r}, target_dir={str(Path(tmp) / 'c')!r}))\n")
        cmd = [sys.executable, str(setup), "--quiet", "build_ext", "--build-lib", str(Path(tmp) / "lib"),
               "--build-temp", str(Path(tmp) / "tmp")]
        p = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                           env={**os.environ, "MYPY_FORCE_COLOR": "0"})
        if p.returncode != 0:
            tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
            print("qdebug native: the mypyc build failed; the engine runs as pure Python:\n  "
                  + "\n  ".join(tail), file=sys.stderr)
            return 1
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(Path(tmp) / "lib", OUT)
    MANIFEST.write_text(json.dumps(_fingerprint()))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        if not up_to_date():
            build()  # a failed build is reported and qdebug runs as pure Python: not an error here
        sys.exit(0)
    if sys.argv[1:] == ["status"]:
        print("compiled engine:", "built, up to date" if up_to_date() else "not built, or stale")
        sys.exit(0)
    print("usage: python -m qdebug.native build|status", file=sys.stderr)
    sys.exit(2)
