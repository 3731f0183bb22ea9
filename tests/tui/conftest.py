"""Fixtures for the TUI tests: small images with known contents, and app drivers."""

from __future__ import annotations

import os
import struct

import pytest

from qdebug.engine.file.image import open_image
from tests.qemu import create, qemu_io


def poke_bitmap(path: str, cluster: int, bitmap: int) -> None:
    """Overwrite the extended-L2 bitmap of `cluster` (first L2 table) to make a test corruption."""
    img = open_image(path, writable=True)
    try:
        l2 = img.l2_offset(0)
        img.pwrite(l2 + cluster * 16 + 8, struct.pack(">Q", bitmap))
    finally:
        img.close()


@pytest.fixture
def layered(tmp_path, qemu):
    """base (4 MiB of 0x11) <- top with: a 3 KiB write at 5k, a zero write, a compressed cluster,
    a discard, and one invalid entry (cluster 40: an allocation bit in an unallocated cluster)."""
    base = create(str(tmp_path / "base.qcow2"), "4M")
    qemu_io(base, "write -P 0x11 0 4M")
    top = create(str(tmp_path / "top.qcow2"), "4M", backing=os.path.basename(base))
    qemu_io(top, "write -P 0x22 5k 3k", "write -z 200k 8k", "write -c -P 0x33 1M 64k", "discard 2M 64k")
    poke_bitmap(top, 40, 0x1)
    return top


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests with asyncio.run (Pilot needs a loop; no async plugin is required)."""
    import asyncio
    import inspect

    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**args))
        return True
    return None


@pytest.fixture
def demo(tmp_path):
    """The `qdebug demo` files, built with qdebug's own engine (no QEMU needed)."""
    from qdebug.demo import build_demo

    return build_demo(str(tmp_path / "demo"))


async def settle(app, pilot) -> None:
    """Let workers finish and their messages be handled (the counts scan starts 1 s after mount)."""
    for _ in range(200):
        if not app.want_counts or app.counts is not None:
            break
        await pilot.pause(0.05)
    await app.workers.wait_for_complete()
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
