"""`python -m qdebug.tui.screenshots DIR`: SVG (and PNG where rsvg-convert exists, made small by
pngquant where that exists) of the main states of the demo, in the default dark theme and a light
one, driven through Pilot (what `make screenshots` runs; the README embeds them)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

from ..demo import build_demo
from .app import make_app

# (file name, keys pressed, theme: None for Textual's default dark one)
STATES = [
    ("main", (), None),
    ("cow-plan", ("n", "n"), None),
    ("repair", ("i", "r"), None),
    ("check", ("c",), None),
    ("help", ("question_mark",), None),
    ("host-view", ("h", "down", "down", "down", "down"), None),
    ("quit-prompt", ("n", "n", "q"), None),
    ("light", ("n", "n"), "textual-light"),
]


async def shoot(paths: dict, keys: tuple[str, ...], svg: str, size: tuple[int, int], theme: str | None = None) -> None:
    app = make_app(paths["image"], trace=paths["trace"])
    app.animation_level = "none"
    async with app.run_test(size=size) as pilot:
        if theme:
            app.theme = theme
        while app.counts is None:
            await pilot.pause(0.05)
        await app.workers.wait_for_complete()
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await app.workers.wait_for_complete()
            await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause(0.2)
        app.save_screenshot(os.path.basename(svg), path=os.path.dirname(svg))


def to_png(svg: str) -> str | None:
    """rsvg-convert with xml:space=preserve (without it padded columns slide left)."""
    if not shutil.which("rsvg-convert"):
        return None
    png = svg[:-4] + ".png"
    with open(svg, encoding="utf-8") as f:
        text = f.read().replace("<svg ", '<svg xml:space="preserve" ', 1)
    subprocess.run(["rsvg-convert", "-o", png], input=text.encode(), check=True)
    if shutil.which("pngquant"):  # a palette PNG: a third of the size, the same pixels to the eye
        subprocess.run(["pngquant", "--quality=80-95", "--speed=1", "--force", "--skip-if-larger",
                        "--output", png, png], check=False)
    return png


def main(argv: list[str] | None = None) -> int:
    out = os.path.abspath((argv or sys.argv[1:] or ["screenshots"])[0])
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")
    with tempfile.TemporaryDirectory(prefix="qdebug-shots-") as tmp:
        paths = build_demo(tmp)
        for name, keys, theme in STATES:
            for size in ((120, 40),):
                svg = os.path.join(out, f"{name}.svg")
                asyncio.run(shoot(paths, keys, svg, size, theme))
                png = to_png(svg)
                print(svg + (f"  {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
