"""JSON Schemas (draft 2020-12) of every JSON output of qdebug: the contract scripts rely on.

Keys are kebab-case (qemu-img's style), numbers are integers (hex only in text output), a value
that does not apply is null. Where the shape is qdebug's own, objects take no other keys
(`additionalProperties: false`): a new key is a deliberate change of its schema. Objects that
are qemu-img's (info, map, check's counts) allow what qemu-img adds; the differential tests hold
those to qemu-img byte for byte. Shipped as package data; tests/cli/test_json_schemas.py
validates real outputs against them.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

# schema name -> (the output it describes, as a script produces it; what it is)
SCHEMAS = {
    "info": ("info --output=json", "qemu-img info's object, plus the \"qdebug\" key (header, geometry, counts)"),
    "info-backing-chain": ("info --backing-chain --output=json", "a list of info objects, the image first"),
    "map": ("map --output=json", "qemu-img map's array of extents"),
    "map-subclusters": ("map --subclusters --output=json", "an array of every non-empty L2 entry and its bitmap"),
    "check": ("check --output=json", "qemu-img check's object, plus located findings"),
    "repair": ("repair --output=json", "the repair plan, the check before and (after a repair) after it"),
    "undo": ("undo --output=json", "the steps undone and what is left in the journal"),
    "plan": ("plan --output=json", "what QEMU 7.2 does for one write or discard"),
    "step-log": ("replay --log FILE", "one JSON line per trace line run or refused (also --log-costs, "
                                      "--log-plans, --log-timing)"),
    "stats": ("stats --output=json", "what a trace costs on an image"),
    "whatif": ("whatif --output=json", "what a trace would cost on other geometries (a list)"),
    "layout": ("layout --output=json", "who owns every host cluster, problems, summary"),
    "salvage-report": ("salvage --report FILE", "every guest range recovered, zero or lost, and totals"),
    "salvage-orphans": ("salvage --orphans DIR", "DIR/orphans.json: the unreferenced clusters saved"),
    "scan": ("scan --output=json", "one JSON line per file: check's record and known-bug signatures, or an error"),
    "bundle-record": ("bundle -o OUT", "the record a metadata-only copy carries (a header extension, or "
                                       "OUT.qdebug-bundle.json beside it)"),
}


def path(name: str) -> Path:
    return HERE / f"{name}.schema.json"


def load(name: str) -> dict:
    return json.loads(path(name).read_text())
