"""`qdebug tui IMAGE` and `qdebug demo`: the entry points of the Textual app.

Textual is imported only here, inside the commands, so `qdebug info` and friends start fast.
"""

from __future__ import annotations

import os

from ..engine.errors import QcowError


def cmd_tui(args) -> int:
    if not os.path.exists(args.image):
        raise QcowError(f"{args.image}: no such file")
    if args.trace and not os.path.exists(args.trace):
        raise QcowError(f"{args.trace}: no such trace file")
    from .conventions import require_terminal

    require_terminal("the debugger (qdebug IMAGE / qdebug tui)")
    from ..tui.app import make_app

    app = make_app(args.image, trace=args.trace, write=args.write, keymap=load_keymap(args.keymap))
    app.run()
    return app.return_code or 0


def load_keymap(path: str | None) -> dict[str, str] | None:
    """A keymap file: lines `binding-id = keys` (ids are listed by `?` in the app; unknown ids are errors)."""
    from ..tui.keymap import load_keymap as load

    return load(path)


def cmd_demo(args) -> int:
    from ..demo import build_demo

    if args.build_only:
        paths = build_demo(args.build_only)
        for key, value in paths.items():
            print(f"{key}: {value}")
        return 0
    import tempfile

    from ..tui.app import make_app
    from .conventions import require_terminal

    require_terminal("qdebug demo (without --build-only)")
    with tempfile.TemporaryDirectory(prefix="qdebug-demo-") as tmp:
        paths = build_demo(tmp)
        app = make_app(paths["image"], trace=paths["trace"], write=False, keymap=load_keymap(None))
        app.run()
        return app.return_code or 0


def register(sub) -> None:
    sp = sub.add_parser("tui", help="open the interactive debugger on an image (also: qdebug IMAGE)")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--trace", metavar="TRACE", help="qemu-io command file to step through")
    sp.add_argument("--write", action="store_true",
                    help="step and repair the image itself (default: a scratch copy; the image stays untouched)")
    sp.add_argument("--keymap", metavar="FILE", help="binding-id = keys lines (default: $QDEBUG_KEYMAP)")
    sp.set_defaults(func=cmd_tui)

    sp = sub.add_parser("demo", help="build a demo image, backing file and trace, and open the debugger on them")
    sp.add_argument("--build-only", metavar="DIR", help="only build the demo files into DIR and print their paths")
    sp.set_defaults(func=cmd_demo)
