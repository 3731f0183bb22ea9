"""`qdebug schema [NAME]`: the JSON Schema of an output (qdebug/schemas), for scripts that validate."""

from __future__ import annotations

import sys

from ..engine.errors import QcowError


def cmd_schema(args) -> int:
    from ..schemas import SCHEMAS, path

    if args.name is None:
        width = max(map(len, SCHEMAS))
        for name, (usage, what) in SCHEMAS.items():
            print(f"{name:<{width}}  qdebug {usage}: {what}")
        return 0
    if args.name not in SCHEMAS:
        raise QcowError(f"schema: no schema named {args.name!r} (`qdebug schema` lists them: "
                        f"{', '.join(SCHEMAS)})")
    sys.stdout.write(path(args.name).read_text())
    return 0


def register(sub) -> None:
    sp = sub.add_parser("schema", help="print the JSON Schema of an output (without NAME: list them)")
    sp.add_argument("name", metavar="NAME", nargs="?", help="a schema name, e.g. check, step-log, map-subclusters")
    sp.set_defaults(func=cmd_schema)
