"""Fleets of images for `qdebug scan` tests and benchmarks, made fast: a few healthy templates made
by QEMU (tests/engine/corruptions.py's shapes), each damaged once with every corruption of the
catalogue that applies to it, then copied. Every copy of a template has the same counts, so
qemu-img check needs to run only once per template to know every verdict of the fleet."""

from __future__ import annotations

import os
import shutil

from tests.engine.corruptions import CORRUPTIONS, corrupt, make_shape


def make_templates(where: str, shapes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(healthy, damaged) template paths: one healthy image per shape, and one per (shape,
    corruption) the shape allows, named SHAPE--CORRUPTION.qcow2."""
    os.makedirs(where, exist_ok=True)
    healthy, damaged = [], []
    for shape in shapes:
        base = make_shape(where, shape)
        healthy.append(base)
        for name in sorted(CORRUPTIONS):
            path = os.path.join(where, f"{shape}--{name}.qcow2")
            shutil.copyfile(base, path)
            if corrupt(path, name) is None:
                os.remove(path)
            else:
                damaged.append(path)
    return healthy, damaged


def make_fleet(where: str, templates: tuple[list[str], list[str]], count: int, *, damaged_every: int = 10,
               per_dir: int = 100) -> dict[str, str]:
    """`count` images in subdirectories of `where` (`per_dir` each): every `damaged_every`-th a copy
    of a damaged template (cycling through them), the others copies of healthy ones. Returns
    image path -> its template."""
    healthy, damaged = templates
    fleet = {}
    for i in range(count):
        if damaged and i % damaged_every == damaged_every - 1:
            src = damaged[(i // damaged_every) % len(damaged)]
        else:
            src = healthy[i % len(healthy)]
        d = os.path.join(where, f"d{i // per_dir:04d}")
        if i % per_dir == 0:
            os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"vm{i:06d}.qcow2")
        shutil.copyfile(src, path)
        fleet[path] = src
    return fleet
