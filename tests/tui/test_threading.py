"""The TUI's threading contract: the UI thread never reads the image outside the model's lock.

Every way the engine reads an image file (Image.pread / l2_table / u64_view / refcount_block /
snapshots, the `mm` and `mapping` maps, RawFile.pread / mm) is wrapped to record a violation when
the UI (main) thread calls it without holding the app's ImageIOLock; a Pilot session then goes
through everything the app does: open, step, back, check, repair, undo, the host view, a
snapshot's map, save as.
"""

from __future__ import annotations

import threading
import traceback
from contextlib import contextmanager

import pytest

from qdebug.engine.file.chain import RawFile
from qdebug.engine.file.image import Image
from qdebug.tui.app import make_app
from tests.tui.conftest import settle

READS = ("pread", "l2_table", "u64_view", "refcount_block", "snapshots", "_head")


class Guard:
    """Records reads of the image made on the UI thread without the lock (one per outermost read:
    a pread that goes on to touch the mapping is one violation, not two)."""

    def __init__(self):
        self.locks: list = []
        self.violations: list[str] = []
        self.checked = 0
        self._depth = 0  # reads in progress on the UI thread (the only thread checked)

    def check(self, what: str) -> None:
        if not self.locks or threading.current_thread() is not threading.main_thread() or self._depth:
            return
        self.checked += 1
        if not any(lock.held() for lock in self.locks):
            self.violations.append(f"{what} on the UI thread without the image lock:\n"
                                   + "".join(traceback.format_stack(limit=10)[:-2]))

    @contextmanager
    def reading(self, what: str):
        self.check(what)
        main = threading.current_thread() is threading.main_thread()
        self._depth += main
        try:
            yield
        finally:
            self._depth -= main


@pytest.fixture
def guard(monkeypatch):
    g = Guard()

    def wrap(cls, name):
        orig = getattr(cls, name)

        def method(self, *a, **kw):
            with g.reading(f"{cls.__name__}.{name}"):
                return orig(self, *a, **kw)
        monkeypatch.setattr(cls, name, method)

    def mapped(cls, name, store):
        """An attribute that holds a file mapping, made a property that checks every read."""

        def get(self):
            g.check(f"{cls.__name__}.{name}")
            return self.__dict__.get(store, b"")

        def set_(self, value):
            self.__dict__[store] = value
        monkeypatch.setattr(cls, name, property(get, set_), raising=False)

    for name in READS:
        wrap(Image, name)
    orig_mm = Image.mm

    def mm(self):
        with g.reading("Image.mm"):
            return orig_mm.fget(self)
    monkeypatch.setattr(Image, "mm", property(mm))
    mapped(Image, "mapping", "_guard_mapping")
    wrap(RawFile, "pread")
    mapped(RawFile, "mm", "_guard_mm")
    return g


def watch(g: Guard, app) -> None:
    g.locks.append(app.model.io_lock)


async def test_the_guard_sees_an_unlocked_read(demo, guard):
    """The instrumentation itself: a read on the UI thread without the lock is recorded."""
    app = make_app(demo["image"], counts=False)
    watch(guard, app)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert not guard.violations
        app.chain.top.pread(0, 8)
        assert len(guard.violations) == 1 and "Image.pread" in guard.violations[0]
        app.chain.layers[1].l2_table(app.chain.layers[1].l2_offset(0))
        assert len(guard.violations) == 2
        with app.model.io_lock.reading():
            app.chain.top.pread(0, 8)
        assert len(guard.violations) == 2


async def test_the_guard_catches_views_that_skip_the_lock(demo, guard):
    """A deliberate violation: the app's lock made a no-op for readers (as if a view forgot it).
    Moving the selection makes the map, the inspector and the hex view read the image: caught."""
    from contextlib import nullcontext

    app = make_app(demo["image"], counts=False)
    watch(guard, app)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert not guard.violations
        app.model.io_lock.reading = nullcontext  # the reader side of the contract broken
        await pilot.press("down", "end", "i")
        await settle(app, pilot)
    assert guard.violations and all("without the image lock" in v for v in guard.violations)
    assert any("inspector" in v or "model" in v for v in guard.violations)


async def test_no_ui_thread_read_outside_the_lock(demo, guard, tmp_path):
    from qdebug.tui.host_view import HostView
    from qdebug.tui.repair_screen import RepairScreen

    app = make_app(demo["image"], trace=demo["trace"])
    watch(guard, app)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        for key in ("n", "n", "p", "c", "i"):
            await pilot.press(key)
            await settle(app, pilot)
        await pilot.press("r")
        await settle(app, pilot)
        assert isinstance(app.screen, RepairScreen)
        await pilot.press("down")  # another policy: planned again
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        await pilot.press("u")
        await settle(app, pilot)
        await pilot.press("h")  # the host view: its layout comes from an engine job
        await settle(app, pilot)
        assert app.query_one(HostView).display and app.query_one(HostView).row_count
        await pilot.press("down", "down", "enter")  # to the guest view at an owner
        await settle(app, pilot)
        await pilot.press("enter")  # and back to its host cluster
        await settle(app, pilot)
        await pilot.press("h", "C", "P", "g")  # the tabs, the go-to prompt (it checks the target)
        await settle(app, pilot)
        await pilot.press(*"cluster 3", "enter")
        await settle(app, pilot)
        await pilot.press("S")  # the demo has no snapshot: says so, reads nothing unlocked
        await settle(app, pilot)
        await pilot.press("n")
        await settle(app, pilot)
        app.save_as(str(tmp_path / "saved.qcow2"))
        await settle(app, pilot)
        await pilot.press("end", "pageup", "home")
        await settle(app, pilot)
    assert guard.checked > 50  # the UI thread did read the image (outermost reads), many times
    assert not guard.violations, guard.violations[0]
