"""Every JSON output of qdebug against its schema (qdebug/schemas, draft 2020-12; issue 17 item 6).

Real outputs of every command on QEMU-made images (snapshots, a qcow2 and a raw backing file,
compressed clusters, zstd, persistent bitmaps, standard L2, compat 0.10) and on corrupt ones; qemu-img's own
info / map / check JSON against the same schemas (they describe qemu-img's objects too); and the
contract's rules on every output: kebab-case keys, no number written as a hex string, one shape
for every record of a step log. A command that gains a JSON output without a schema fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from jsonschema import Draft202012Validator

from qdebug.schemas import SCHEMAS, load, path
from tests.engine.corruptions import corrupt, make_shape
from tests.qemu import create, qemu_img, qemu_io, require_qemu

QDEBUG = [sys.executable, "-m", "qdebug.cli"]
KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
HEX = re.compile(r"^0x[0-9a-fA-F]+$")
_VALIDATORS: dict[str, Draft202012Validator] = {}


def qd(*args, ok=(0,), cwd=None) -> str:
    p = subprocess.run([*QDEBUG, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd,
                       stdin=subprocess.DEVNULL)
    assert p.returncode in ok, (args, p.returncode, p.stderr)
    return p.stdout


def conforms(name: str, value) -> None:
    """`value` is valid against schema `name` and keeps the contract's rules everywhere inside."""
    if name not in _VALIDATORS:
        _VALIDATORS[name] = Draft202012Validator(load(name))
    errors = sorted(_VALIDATORS[name].iter_errors(value), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{name}: at {list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5]]
    _contract_rules(value, name)


def _contract_rules(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert KEBAB.match(k), f"{where}: key {k!r} is not kebab-case"
            _contract_rules(v, f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _contract_rules(v, where)
    elif isinstance(value, str):
        assert not HEX.match(value), f"{where}: the number {value!r} is written as a hex string"


def json_lines(text: str) -> list:
    return [json.loads(ln) for ln in text.splitlines()]


# ---- the schemas themselves ---------------------------------------------------------------------------
def test_every_schema_is_a_valid_draft_2020_12_schema():
    files = sorted(p.name for p in path("info").parent.glob("*.schema.json"))
    assert files == sorted(f"{n}.schema.json" for n in SCHEMAS)  # listed in SCHEMAS, and nothing else
    for name in SCHEMAS:
        schema = load(name)
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"].endswith(f"/{name}.schema.json") and schema["title"] and schema["description"]


def _objects(node):
    if isinstance(node, dict):
        if "properties" in node:
            yield node
        for v in node.values():
            yield from _objects(v)
    elif isinstance(node, list):
        for v in node:
            yield from _objects(v)


def test_our_objects_take_no_other_keys():
    """additionalProperties false wherever the shape is qdebug's (a new key is a schema change);
    only qemu-img's own objects (info, map, check's counts) allow more, and say so."""
    for name in SCHEMAS:
        for o in _objects(load(name)):
            qemu = o.get("$comment", "").startswith("qemu-img's")
            assert (o.get("additionalProperties") is False) != qemu, (name, sorted(o["properties"]))


def _subcommands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield (*prefix, name), sp
                yield from _subcommands(sp, (*prefix, name))


def _json_options(sp) -> list[str]:
    """The options with which a command writes JSON: `--output` offering json, a FILE.json(l) metavar."""
    out = []
    for a in sp._actions:
        if not a.option_strings:
            continue
        opt = max(a.option_strings, key=len)
        if a.choices and "json" in a.choices:
            out.append(f"{opt}=json")
        elif isinstance(a.metavar, str) and re.search(r"\.jsonl?$", a.metavar):
            out.append(opt)
        elif "orphans" in opt:  # salvage --orphans DIR writes DIR/orphans.json
            out.append(opt)
    return out


def test_every_json_output_of_every_command_has_a_schema():
    from qdebug.cli.main import build_parser

    described = {usage for usage, _what in SCHEMAS.values()}
    found = []
    for words, sp in _subcommands(build_parser()):
        for opt in _json_options(sp):
            cmd = " ".join(words)
            found.append(cmd)
            assert any(u.startswith(f"{cmd} ") and opt.split("=")[0] in u for u in described), \
                f"`qdebug {cmd} {opt}` writes JSON and qdebug/schemas has no schema for it"
    assert {"info", "map", "check", "repair", "undo", "plan", "replay", "stats", "whatif", "layout", "salvage",
            "scan"} <= set(found)


# ---- real outputs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """QEMU-made images of many shapes, a qcow2 chain with a snapshot and compressed clusters, and
    corrupt copies (both bits set, a leak, an L2 entry shared by two clusters, data past the end)."""
    require_qemu()
    d = tmp_path_factory.mktemp("schemas")
    out = {name: make_shape(d, name) for name in ("ext32k-snap", "ext64k-backing", "ext64k-zstd", "std64k",
                                                  "v2-64k", "ext64k-bitmaps")}
    base = create(str(d / "base.qcow2"), "4M")
    qemu_io(base, "write -P 1 0 1M", "write -c -P 2 1M 128k")
    top = create(str(d / "top.qcow2"), "4M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 3 8k 4k", "write -z 64k 64k", "write -z 256k 4k")
    qemu_img("snapshot", "-c", "s1", top)
    qemu_io(top, "write -c -P 5 192k 64k", "write -P 6 512k 2k")
    out["chain"] = top
    for kind in ("both_bits", "leak_free_cluster", "l2_duplicate", "data_past_eof", "compressed_bitmap"):
        (d / kind).mkdir()
        out[kind] = make_shape(d / kind, "ext64k")
        assert corrupt(out[kind], kind)
    return out


READ_ONLY = ["ext32k-snap", "ext64k-backing", "ext64k-zstd", "std64k", "v2-64k", "ext64k-bitmaps", "chain",
             "both_bits", "leak_free_cluster", "l2_duplicate", "data_past_eof", "compressed_bitmap"]


@pytest.mark.parametrize("name", READ_ONLY)
def test_info_map_check_layout_repair_salvage_outputs(images, name, tmp_path):
    img = images[name]
    conforms("info", json.loads(qd("info", "--output=json", img)))
    conforms("info", json.loads(qd("info", "--output=json", "--no-backing", img)))
    whole = subprocess.run([*QDEBUG, "map", "--output=json", img], capture_output=True, text=True)
    if whole.returncode == 0:  # (an invalid entry fails map, as qemu-img map)
        conforms("map", json.loads(whole.stdout))
    conforms("map-subclusters", json.loads(qd("map", "--subclusters", "--output=json", img)))
    conforms("check", json.loads(qd("check", "--output=json", img, ok=(0, 2, 3))))
    conforms("layout", json.loads(qd("layout", "--output=json", img)))
    conforms("repair", json.loads(qd("repair", "--dry-run", "--output=json", img, ok=(0, 2, 3))))
    report, orphans = tmp_path / "r.json", tmp_path / "orphans"
    qd("salvage", img, "-o", tmp_path / "out.raw", "--report", report, "--orphans", orphans, ok=(0, 1))
    conforms("salvage-report", json.loads(report.read_text()))
    conforms("salvage-orphans", json.loads((orphans / "orphans.json").read_text()))
    qd("salvage", img, "--report", report, ok=(0, 1))  # no output: its path and format null
    rep = json.loads(report.read_text())
    conforms("salvage-report", rep)
    assert rep["output"] == {"path": None, "format": None}


@pytest.mark.parametrize("name", ["ext32k-snap", "ext64k-zstd", "std64k", "v2-64k", "ext64k-bitmaps", "chain",
                                  "both_bits"])
def test_qemu_img_own_json_fits_the_schemas_of_its_outputs(images, name):
    """The schemas of the outputs that are qemu-img's describe qemu-img's real output too (its
    keys, persistent bitmaps included); qdebug's "qdebug" key is added where the schema asks for it."""
    img = images[name]
    ours = json.loads(qd("info", "--output=json", img))
    theirs = json.loads(qemu_img("info", "--output=json", img).stdout)
    conforms("info", {**theirs, "qdebug": ours["qdebug"]})
    if name == "ext64k-bitmaps":
        assert [b["name"] for b in theirs["format-specific"]["data"]["bitmaps"]] == ["b0", "b1"]
    chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", img).stdout)
    conforms("info-backing-chain", [{**layer, "qdebug": ours["qdebug"]} for layer in chain])
    check = subprocess.run([shutil.which("qemu-img"), "check", "--output=json", img], capture_output=True, text=True)
    conforms("check", {**json.loads(check.stdout), "findings": []})
    if name != "both_bits":
        conforms("map", json.loads(qemu_img("map", "--output=json", img).stdout))


def test_info_backing_chain_output(images):
    """`info --backing-chain` (where this build has it) is a list of info objects."""
    from qdebug.cli.main import build_parser

    sub = dict(_subcommands(build_parser()))[("info",)]
    if "--backing-chain" not in sub._option_string_actions:
        pytest.xfail("info --backing-chain is not in this build")
    chain = json.loads(qd("info", "--backing-chain", "--output=json", images["chain"]))
    conforms("info-backing-chain", chain)
    assert len(chain) == 2


def test_map_subclusters_is_one_array_of_integers_with_null_for_absent_offsets(images):
    rows = json.loads(qd("map", "--subclusters", "--output=json", images["chain"]))
    by = {r["cluster"]: r for r in rows}
    assert by[1]["host-offset"] is None and by[1]["entry"] == 0 and by[1]["bitmap"] == 0xFFFFFFFF << 32  # zero
    assert by[3]["host-offset"] is None and by[3]["subclusters"] == "_".join(["C" * 8] * 4)  # compressed
    assert isinstance(by[0]["entry"], int) and by[0]["host-offset"] == by[0]["entry"] & ((1 << 56) - 512)
    std = json.loads(qd("map", "--subclusters", "--output=json", images["std64k"]))
    assert std and all(r["bitmap"] is None for r in std)  # standard L2 entries have no bitmap
    empty = create(str(os.path.dirname(images["chain"]) + "/empty.qcow2"), "1M")
    assert qd("map", "--subclusters", "--output=json", empty) == "[]\n"


def test_scan_records(images, tmp_path):
    d = os.path.dirname(images["chain"])
    (tmp_path / "notes.txt").write_text("not an image\n")
    lines = json_lines(qd("scan", "--output=json", "-j", "1", d, tmp_path / "notes.txt", ok=(1, 2, 3)))
    for rec in lines:
        conforms("scan", rec)
    by = {os.path.basename(r["filename"]): r for r in lines}
    assert by["notes.txt"]["check-exit-code"] == 1 and "error" in by["notes.txt"]
    assert any(r.get("signatures") for r in lines)
    for rec in json_lines(qd("scan", "--output=json", "--no-signatures", "-j", "1", d, ok=(1, 2, 3))):
        conforms("scan", rec)
        assert rec["signatures"] is None


TRACE = ["write -P 7 0 4k", "write -z 64k 8k", "bogus 1 2", "discard 128k 64k", "writev -P 9 1M 512 512",
         "write -P 1 100M 4k", "flush", "write -c -P 3 2M 64k", "aio_write -P 4 3M 4k"]


@pytest.mark.parametrize("flags", [(), ("--log-costs",), ("--log-plans",), ("--log-timing",),
                                   ("--log-costs", "--log-timing"), ("--log-plans", "--log-timing")])
def test_step_log_records(images, tmp_path, flags):
    """Every record of a log (steps, a refused line, a failed command) fits and has the same keys."""
    trace = tmp_path / "t.trace"
    trace.write_text("\n".join(TRACE) + "\n")
    shutil.copyfile(os.path.join(os.path.dirname(images["chain"]), "base.qcow2"), tmp_path / "base.qcow2")
    for mode in (("--dry-run",), ("--journal",)):
        img = str(tmp_path / "a.qcow2")
        shutil.copyfile(images["chain"], img)
        recs = json_lines(qd("replay", *mode, "--keep-going", "--log", "-", *flags, img, trace, ok=(1,)))
        assert [r["line"] for r in recs] == list(range(1, len(TRACE) + 1))  # every line, refused ones too
        for rec in recs:
            conforms("step-log", rec)
        assert len({tuple(r) for r in recs}) == 1, [list(r) for r in recs]
        refused = [r for r in recs if r["index"] is None]
        assert [r["command"] for r in refused] == ["bogus 1 2"] and refused[0]["error"]
        assert any(r["index"] is not None and r["error"] for r in recs)  # the write past the end failed
        assert ("seconds" in recs[0]) == ("--log-timing" in flags)


def test_step_log_of_a_hazard(tmp_path, qemu):
    """QEMU 7.2's compressed write over a cluster it then shares (tests/cli/test_write_cli.py): the
    hazard, with the guest range it corrupts, in the record under every --log-* option."""
    trace = tmp_path / "t.trace"
    trace.write_text("write -c -P 0x67 0 64k\nwrite -P 0x35 1k 3k\nwrite -P 0x3c 1M 512\nwrite -c -P 0x8a 2M 64k\n")
    for flags in ((), ("--log-plans",), ("--log-costs", "--log-timing")):
        img = create(str(tmp_path / "h.qcow2"), "4M")
        recs = json_lines(qd("replay", "--log", "-", *flags, img, trace))
        for rec in recs:
            conforms("step-log", rec)
        assert [bool(r["hazards"]) for r in recs] == [False, False, False, True]
        assert recs[3]["hazards"][0]["guest-range"]["start"] >= 1 << 20


def test_plan_stats_whatif_undo_repair(images, tmp_path):
    d = os.path.dirname(images["chain"])
    for cmd in ("write -P 1 0 4k", "write -z 64k 8k", "discard 128k 64k", "write -c -P 2 1M 64k"):
        conforms("plan", json.loads(qd("plan", "--output=json", images["chain"], cmd, cwd=d)))
    trace = tmp_path / "t.trace"
    trace.write_text("write -P 1 0 4k\nwrite -P 2 1M 64k\nwrite -z 2M 4k\ndiscard 0 64k\n")
    for policy in ("qemu", "minimal-cow"):
        conforms("stats", json.loads(qd("stats", "--output=json", "--policy", policy, images["chain"], trace, cwd=d)))
    rows = json.loads(qd("whatif", "--output=json", "--size", "4M", "--cluster-size", "64k,2M", "--extended-l2",
                         "on,off", "--policy", "minimal-cow", trace))
    conforms("whatif", rows)
    assert sum(r["recommended"] for r in rows) == 1
    img = str(tmp_path / "j.qcow2")
    shutil.copyfile(images["chain"], img)
    shutil.copyfile(os.path.join(d, "base.qcow2"), tmp_path / "base.qcow2")
    qd("replay", "--journal", img, trace)
    conforms("undo", json.loads(qd("undo", "--output=json", "--steps", "2", img)))
    conforms("undo", json.loads(qd("undo", "--output=json", "--discard-journal", img)))
    broken = str(tmp_path / "b.qcow2")
    shutil.copyfile(images["both_bits"], broken)
    rep = json.loads(qd("repair", "--output=json", broken))
    conforms("repair", rep)
    assert rep["after"]["check-errors"] == 0 and rep["journal-steps"] == [rep["journal-step"]]
    undone = json.loads(qd("undo", "--output=json", broken))  # a repair's step: one shape, command null-free
    conforms("undo", undone)
    assert undone["steps"][0]["index"] is None and undone["steps"][0]["command"].startswith("repair")
    leaky = str(tmp_path / "l.qcow2")
    shutil.copyfile(images["leak_free_cluster"], leaky)
    fixed = json.loads(qd("check", "-r", "leaks", "--output=json", leaky))
    conforms("check", fixed)
    assert fixed["findings-before-repair"] and fixed.get("leaks-fixed")


def test_schema_command_prints_the_installed_schemas():
    listing = qd("schema").splitlines()
    assert [ln.split()[0] for ln in listing] == list(SCHEMAS)
    for name in SCHEMAS:
        assert json.loads(qd("schema", name)) == load(name)
    p = subprocess.run([*QDEBUG, "schema", "nope"], capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1
    assert p.stderr.startswith("qdebug: error: schema: no schema named 'nope'")


@pytest.mark.parametrize("name", ["chain", "v2-64k"])
def test_bundle_record(images, name, tmp_path):
    """In a header extension (info shows it, without data-holes) or, for a v2 image, in a side file."""
    out = tmp_path / "b.qcow2"
    qd("bundle", images[name], "-o", out)
    side = tmp_path / "b.qcow2.qdebug-bundle.json"
    assert side.exists() == (name == "v2-64k")
    if side.exists():
        conforms("bundle-record", json.loads(side.read_text()))
    info = json.loads(qd("info", "--output=json", "--no-backing", out))
    conforms("info", info)
    conforms("bundle-record", info["qdebug"]["bundle"])
