"""The TUI opening hostile images: an image that cannot be opened is one CLI error line; one that
opens with broken parts (tables past EOF, invalid entries, bad compressed data) keeps the app alive
and shows the problem in the app, while the user moves around it."""

from __future__ import annotations

import asyncio
import os

import pytest

from qdebug.engine.errors import QcowError
from tests.hostile.driver import fingerprint
from tests.hostile.images import build_bases
from tests.hostile.mutate import make_mutant
from tests.qemu import require_qemu

MUTANTS = int(os.environ.get("QDEBUG_TUI_FUZZ_EXAMPLES", "8"))
SEED = 770000


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    require_qemu()
    return build_bases(str(tmp_path_factory.mktemp("tui-bases")))


def _cases(layouts):
    names = sorted(layouts)
    return [(names[i % len(names)], SEED + i) for i in range(MUTANTS)]


def test_tui_survives_hostile_images(layouts, tmp_path):
    asyncio.run(_drive(layouts, tmp_path))


async def _drive(layouts, tmp_path):
    from qdebug.tui.app import make_app

    opened = refused = 0
    for base, seed in _cases(layouts):
        work = tmp_path / f"{base}-{seed}"
        path, mutations = make_mutant(layouts[base], seed, str(work))
        before = fingerprint(str(work))
        try:
            app = make_app(path)
        except QcowError as e:
            assert "\n" not in str(e) and str(e), (base, seed, mutations)
            refused += 1
            continue
        async with app.run_test(size=(120, 40)) as pilot:
            await app.workers.wait_for_complete()
            for key in ("down", "right", "pagedown", "end", "home", "tab", "c"):
                await pilot.press(key)
                await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.is_running, (base, seed, mutations)
        assert app.return_code in (None, 0), (base, seed, mutations, app.return_code)
        app.bench.close() if hasattr(app.bench, "close") else None
        assert fingerprint(str(work)) == before, f"the read-only TUI changed {base} seed {seed}"
        opened += 1
    assert opened and refused, (opened, refused)  # both paths exercised
