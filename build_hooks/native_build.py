"""setuptools commands that put the compiled write engine into the wheel.

`build_py` copies the sources as usual, then runs qdebug/native.py's compile_into on the copy in
the build directory: the compiled modules and their manifest of source hashes land in
qdebug/_native/ inside the wheel, exactly where `make install` puts them in a checkout, and are
used only while the installed sources match. Without mypyc or a C compiler the build says why
and the wheel is pure Python (it still installs and runs). `bdist_wheel` tags the wheel for this
interpreter and platform only when compiled modules are in it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
from setuptools.command.build_py import build_py as _build_py


def _native_dir(build_lib: str) -> Path:
    return Path(build_lib) / "qdebug" / "_native"


class BuildPy(_build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode or os.environ.get("QDEBUG_NATIVE", "1") == "0":
            return  # an editable install compiles in place (`python -m qdebug.native build`)
        path = Path(self.build_lib) / "qdebug" / "native.py"
        spec = importlib.util.spec_from_file_location("qdebug_native_build", path)
        assert spec is not None and spec.loader is not None
        native = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(native)  # its package is the copy in build_lib
        native.compile_into()


class BdistWheel(_bdist_wheel):
    def run(self) -> None:
        self.run_command("build")
        build_lib = self.get_finalized_command("build_py").build_lib
        if any(_native_dir(build_lib).rglob("*.so")):
            self.root_is_pure = False
            self.distribution.has_ext_modules = lambda: True  # everything goes to platlib
        super().run()
