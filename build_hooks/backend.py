"""qdebug's PEP 517 build backend: setuptools', and mypy in the build environment of a wheel.

A wheel (`pip install .`, `python -m build`) compiles the write engine's hot modules with mypyc
(native_build.BuildPy), so mypy is one of its build requirements; an editable install (`make
install`) compiles them in place afterwards instead. QDEBUG_NATIVE=0 builds a pure Python wheel
without asking for mypy (an offline machine without it on its package index).
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook setuptools offers)

MYPY = "mypy==2.4.1"  # as the `native` extra pins it


def get_requires_for_build_wheel(config_settings=None):
    extra = [MYPY] if os.environ.get("QDEBUG_NATIVE", "1") != "0" else []
    return _setuptools.get_requires_for_build_wheel(config_settings) + extra
