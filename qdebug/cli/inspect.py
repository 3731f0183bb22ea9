"""`qdebug info | map | read`: seeing an image, as qemu-img info / map and qemu-io read show it."""

from __future__ import annotations

import json
import re
import sys

from ..engine.errors import QcowError
from .common import human_size, one_line, size_arg
from .common import warn as _warn


def cmd_info(args) -> int:
    """qemu-img info: this image alone (a missing or refused backing file is a warning, as qemu-img
    opens it without its backing file); with --backing-chain every image of the chain, or nothing
    and exit 1 if a link cannot be opened (qemu-img collects them all before printing)."""
    from ..engine.errors import BackingError
    from ..engine.file.chain import DataFiles, open_chain

    # qemu-img info opens no data file (a missing one is no error there)
    try:
        chain = open_chain(args.image, no_backing=args.no_backing, data_files=DataFiles.SKIP)
        problem = None
    except BackingError as e:
        if args.backing_chain:
            raise
        chain, problem = open_chain(args.image, no_backing=True, data_files=DataFiles.SKIP), str(e)
    with chain:
        records = _layer_records(chain, args.image, args.backing_chain)
    if problem:
        records[0]["qdebug"]["warnings"].insert(0, f"{problem}; qdebug's section describes this image alone")
    for rec in records:
        if "qdebug" in rec:
            _warn(rec["qdebug"]["warnings"])
    if args.output == "json":
        doc = [qdict_order(r) for r in records] if args.backing_chain else qdict_order(records[0])
        print(qemu_json(doc))
        return 0
    print("\n\n".join("\n".join(one_line(ln) for ln in info_lines(r)) for r in records))
    return 0


def _layer_records(chain, image: str, every_layer: bool) -> list[dict]:
    """The info records of the chain's top image (of each of its images: `every_layer`)."""
    from ..engine.file.chain import Chain, backing_warning
    from ..engine.forensics.bundle import bundle_info
    from ..engine.read.summary import info_record, raw_info_record

    out = []
    for depth, layer in enumerate(chain.layers if every_layer else chain.layers[:1]):
        if getattr(layer, "format", "qcow2") == "raw":
            out.append(raw_info_record(layer))
            continue
        rec = info_record(Chain(chain.layers[depth:], list(chain.warnings) if depth == 0 else []))
        outside = backing_warning(layer.path if depth else image, layer.header.backing_file)
        if outside:
            rec["qdebug"]["warnings"].append(outside)
        bundle = bundle_info(layer.header, layer.path if depth else image)
        if bundle is not None:  # (the holes of the original's data clusters are for `map`, not for reading)
            rec["qdebug"]["bundle"] = {k: v for k, v in bundle.items() if k != "data-holes"}
        out.append(rec)
    return out


def info_lines(rec: dict) -> list[str]:
    """One image's `qemu-img info` text (then qdebug's own section, for a qcow2 image)."""
    lines = [
        f"image: {rec['filename']}",
        f"file format: {rec['format']}",
        f"virtual size: {human_size(rec['virtual-size'])} ({rec['virtual-size']} bytes)",
        f"disk size: {human_size(rec['actual-size'])}",
    ]
    if rec["format"] != "qcow2":
        return lines
    lines.append(f"cluster_size: {rec['cluster-size']}")
    if rec["dirty-flag"]:
        lines.append("cleanly shut down: no")
    if "backing-filename" in rec:
        full = rec["full-backing-filename"]
        actual = f" (actual path: {full})" if full != rec["backing-filename"] else ""
        lines.append(f"backing file: {rec['backing-filename']}{actual}")
    if "backing-filename-format" in rec:
        lines.append(f"backing file format: {rec['backing-filename-format']}")
    if "snapshots" in rec:
        lines.append("Snapshot list:")
        lines += snapshot_table(rec["snapshots"])
    fs = rec["format-specific"]["data"]
    lines.append("Format specific information:")
    for key, val in qdict_order(fs).items():  # (QEMU's human dump walks the same QDict)
        if key == "bitmaps":
            lines.append("    bitmaps:")
            lines += _bitmap_lines(val)
        else:
            lines.append(f"    {key.replace('-', ' ')}: {str(val).lower() if isinstance(val, bool) else val}")
    return lines + _qdebug_lines(rec["qdebug"])


def _bitmap_lines(bitmaps: list[dict]) -> list[str]:
    """qemu-img info's "bitmaps:" block (QAPI's human dump: list items as [i], nested by 4)."""
    lines = []
    for i, b in enumerate(bitmaps):
        lines.append(f"        [{i}]:")
        lines.append("            flags:")
        lines += [f"                [{k}]: {flag}" for k, flag in enumerate(b["flags"])]
        lines.append(f"            name: {b['name']}")
        lines.append(f"            granularity: {b['granularity']}")
    return lines


def qemu_json(value, level: int = 0) -> str:
    """JSON laid out as QEMU's pretty printer does (an empty list or object still spans two lines);
    qdebug's own `qdebug` value keeps Python's layout."""
    pad, inner = " " * (4 * level), " " * (4 * (level + 1))
    if isinstance(value, dict):
        items = [f"\n{inner}{json.dumps(k)}: " + (json.dumps(v, indent=4).replace("\n", "\n" + inner)
                                                  if k == "qdebug" else qemu_json(v, level + 1))
                 for k, v in value.items()]
        return "{" + ",".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        return "[" + ",".join(f"\n{inner}{qemu_json(v, level + 1)}" for v in value) + f"\n{pad}]"
    if isinstance(value, str):  # QEMU escapes DEL too, and writes \u escapes in upper case
        return _U_ESCAPE.sub(lambda m: m[1] + "\\u" + m[0][-4:].upper(), json.dumps(value)).replace("\x7f", "\\u007F")
    return json.dumps(value)


_U_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u[0-9a-f]{4}")


def _qdebug_lines(q: dict) -> list[str]:
    """qdebug's own section of `info`: what qemu-img does not show."""
    g = q["geometry"]
    lines = ["qdebug:"]
    if "bundle" in q:
        b = q["bundle"]
        lines.append(f"    BUNDLE: a metadata-only copy of {b.get('source')!r} made by {b.get('made-by')} on "
                     f"{b.get('date')}: guest data removed ({json.dumps(b.get('removed'))}); reads return zeros")
    lines.append(f"    version: {q['version']}, header length: {q['header-length']}")
    feats = ", ".join(f"{f['name']} ({f['type']} bit {f['bit']})" for f in q["features"]) or "none"
    lines.append(f"    feature bits: {feats}")
    for e in q["extensions"]:
        lines.append(f"    header extension 0x{e['type']:08x} {e['name']}: {e['length']} bytes at 0x{e['offset']:x}")
    lines.append(f"    subclusters: {g['subclusters-per-cluster']} per cluster of {g['subcluster-size']} bytes, "
                 f"{g['l2-entry-size'] * 8}-bit L2 entries, {g['l2-entries-per-table']} per L2 table")
    lines.append(f"    L1 table: {g['l1-size']} entries at 0x{g['l1-table-offset']:x}, {g['l2-tables']} L2 tables")
    lines.append(f"    refcount table: {g['refcount-table-clusters']} cluster(s) at 0x{g['refcount-table-offset']:x}, "
                 f"{g['refcount-blocks']} refcount block(s) of {g['refcount-block-entries']} "
                 f"{1 << g['refcount-order']}-bit entries")
    lines.append(f"    file size: {g['file-size']}")
    for layer in q["backing-chain"]:
        lines.append(f"    chain depth {layer['depth']}: {layer['filename']} ({layer['format']}, "
                     f"{layer['virtual-size']} bytes)")
    counts = q["subclusters"]
    lines.append("    subclusters by type: " + ", ".join(f"{k.upper().replace('-', '_')} {v}" for k, v in counts.items()))
    return lines


def snapshot_table(snapshots: list[dict]) -> list[str]:
    """qemu-img info's snapshot list (bdrv_snapshot_dump): dates in local time, the VM clock as
    hh:mm:ss.mmm, sizes as size_to_str, ICOUNT blank where the snapshot recorded none."""
    import time

    rows = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snapshots:
        secs = s["vm-clock-sec"]
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 10**6 % 1000:03d}"
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        icount = str(s["icount"]) if "icount" in s else ""
        rows.append(f"{s['id']:<9} {s['name']:<16} {human_size(s['vm-state-size']):>8}{date:>20}{clock:>13}{icount:>11}")
    return rows


def _qdict_bucket(key: str) -> int:
    """QEMU's QDict bucket for a key (tdb_hash modulo 512): the order qemu-img's JSON lists keys in."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, c in enumerate(key.encode()):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qdict_order(value):
    """A JSON value with every object's keys in qemu-img's order (qdebug's own `qdebug` key last)."""
    if isinstance(value, list):
        return [qdict_order(v) for v in value]
    if not isinstance(value, dict):
        return value
    keys = sorted((k for k in value if k != "qdebug"), key=_qdict_bucket)
    out = {k: (qdict_order(value[k]) if k != "qdebug" else value[k]) for k in keys}
    if "qdebug" in value:
        out["qdebug"] = value["qdebug"]
    return out


# ---- map ------------------------------------------------------------------------------------------
def cmd_map(args) -> int:
    from ..engine.file.chain import DataFiles, open_chain
    from ..engine.read.mapping import map_extents, write_json

    out = sys.stdout
    with open_chain(args.image, no_backing=args.no_backing, data_files=DataFiles.OPEN) as chain:
        _warn(chain.warnings)
        if args.subclusters:
            if args.start_offset or args.max_length is not None:
                raise QcowError("map: --start-offset/--max-length select extents; --subclusters lists every cluster")
            return _map_subclusters(chain, out, args.output)
        # qemu-img map's range: [start, start + max-length) within the disk
        span = {"start": args.start_offset,
                "end": None if args.max_length is None else args.start_offset + args.max_length}
        if args.output == "json":
            if args.start_offset >= min(chain.size, span["end"] if span["end"] is not None else chain.size):
                # an empty range: qemu-img's loop prints its one zero-length entry at the start
                out.write(f'[{{ "start": {args.start_offset}, "length": 0, "depth": 0, "present": false, '
                          '"zero": false, "data": false}]\n')
                return 0
            write_json(chain, out, **span)
            return 0
        if not args.wide:
            return _map_human(chain, out, span)
        out.write(f"{'Offset':<16}{'Length':<16}{'Depth':<6}{'Status':<12}{'Mapped to':<16}File\n")
        for batch in map_extents(chain, **span):
            rows = []
            for s, ln, d, pr, z, da, ho, off, comp in zip(
                    batch.start.tolist(), batch.length.tolist(), batch.depth.tolist(), batch.present.tolist(),
                    batch.zero.tolist(), batch.data.tolist(), batch.has_offset.tolist(), batch.offset.tolist(),
                    batch.compressed.tolist()):
                status = ("compressed" if comp else "data") if da else ("zero" if pr else "unallocated")
                mapped = f"{off:#x}" if ho else "-"
                fname = one_line(_data_name(chain.layers[d])) if ho else "-"
                if ho and da:
                    fname += _past_eof(chain.layers[d], off, ln)
                rows.append(f"{s:<#16x}{ln:<#16x}{d:<6}{status:<12}{mapped:<16}{fname}\n")
            out.write("".join(rows))
    return 0


def _hex0(n: int) -> str:
    """printf's %#x: 0 without the 0x."""
    return f"{n:#x}" if n else "0"


def _map_human(chain, out, span: dict) -> int:
    """qemu-img map's human output exactly: the extents holding data (not reading as zeros), with
    their host offset and file; compressed data has no such place, and qemu-img refuses then."""
    from ..engine.read.mapping import map_extents

    out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
    for batch in map_extents(chain, **span):
        rows = []
        for s, ln, d, z, da, ho, off in zip(
                batch.start.tolist(), batch.length.tolist(), batch.depth.tolist(), batch.zero.tolist(),
                batch.data.tolist(), batch.has_offset.tolist(), batch.offset.tolist()):
            if da and not ho:
                out.write("".join(rows))
                out.flush()
                raise QcowError(f"{chain.top.path}: File contains external, encrypted or compressed clusters "
                                "(qemu-img map's words; `qdebug map --wide` lists them)")
            if da and not z:
                rows.append(f"{_hex0(s):<16}{_hex0(ln):<16}{_hex0(off):<16}{one_line(_data_name(chain.layers[d]))}\n")
        out.write("".join(rows))
    return 0


def _data_name(layer) -> str:
    """The file a layer's data lives in, as qemu-img map's File column names it (the external
    data file of an image that has one)."""
    return getattr(layer, "data_name", layer.path)


def _past_eof(layer, host: int, length: int) -> str:
    """A note for data whose host bytes lie past the end of the file that holds them (the image,
    or its external data file): QEMU reads zeros there."""
    if getattr(layer, "format", "qcow2") == "raw":
        return ""
    size = layer.data_size
    if host + length <= size:
        return ""
    if host >= size:
        return f"  [past the end of the file (0x{size:x}): reads as zeros]"
    return f"  [partly past the end of the file (0x{size:x}): the rest reads as zeros]"


def _data_bytes(h, cluster: int, bitmap: int) -> int:
    """How far into its host cluster a guest cluster's data reaches (its last allocated subcluster;
    the end of the disk for a last partial cluster)."""
    cs = h.cluster_size
    n = min(cs, h.size - cluster * cs)
    if h.extended_l2:
        alloc = bitmap & 0xFFFFFFFF
        n = min(n, alloc.bit_length() * (cs // 32))
    return n


def _map_subclusters(chain, out, output: str) -> int:
    """Each allocated cluster's L2 entry and bitmap string, streamed. JSON: one array, as `map
    --output=json` frames it (an element a line), written batch by batch (never built whole);
    entry and bitmap as integers (bitmap null without extended L2), host-offset null where the
    entry has none (compressed, or an unallocated cluster with only zero flags)."""
    import numpy as np

    from ..engine.format import constants as C
    from ..engine.format.subclusters import bitmap_strings, classify
    from ..engine.read.l2tables import iter_l2_batches

    img = chain.top
    h = img.header
    cs = h.cluster_size
    _refuse_tables_past_eof(img)
    data_size = img.data_size
    sep = "["  # before the next JSON element: the array opens with the first one
    for gcs, w0, bm in iter_l2_batches(img):
        w0 = np.asarray(w0, dtype=np.uint64)
        bmu = np.asarray(bm, dtype=np.uint64) if bm is not None else np.zeros(len(w0), dtype=np.uint64)
        nonempty = (w0 != 0) | (bmu != 0)
        if not nonempty.any():
            continue
        sel = np.flatnonzero(nonempty)
        types = classify(w0[sel], bmu[sel] if h.extended_l2 else None, extended=h.extended_l2,
                         data_file=h.has_data_file)
        strings = bitmap_strings(types)
        rows = []
        for k, i in enumerate(sel.tolist()):
            g = int(gcs[i])
            word0 = int(w0[i])
            host = word0 & C.L2E_OFFSET_MASK if not word0 & C.QCOW_OFLAG_COMPRESSED else None
            if host == 0 and not (h.has_data_file and word0 & C.QCOW_OFLAG_COPIED):
                host = None  # (offset 0 is a place only in an external data file, with COPIED)
            past = host is not None and host + _data_bytes(h, g, int(bmu[i])) > data_size
            if output == "json":
                row = {"cluster": g, "start": g * cs, "l1-index": g // h.l2_entries, "l2-index": g % h.l2_entries,
                       "entry": word0, "bitmap": int(bmu[i]) if h.extended_l2 else None, "host-offset": host,
                       "copied": bool(word0 >> 63), "subclusters": strings[k]}
                if past:
                    row["past-eof"] = True
                rows.append(sep + json.dumps(row))
                sep = ",\n"
            else:
                hs = "compressed" if word0 & C.QCOW_OFLAG_COMPRESSED else f"{host or 0:#x}"
                if past:
                    hs += _past_eof(img, host, _data_bytes(h, g, int(bmu[i])))
                rows.append(f"{g * cs:<#16x}cluster {g:<10} {strings[k]}  {hs}\n")
        out.write("".join(rows))
    if output == "json":
        out.write("[]\n" if sep == "[" else "]\n")
    return 0


def _refuse_tables_past_eof(img) -> None:
    """The bitmap listing must not silently skip an L2 table it cannot read."""
    from ..engine.errors import CorruptImage
    from ..engine.read.l2tables import l2_table_offsets

    t = l2_table_offsets(img)
    h = img.header
    t = t[(t[:, 0] * h.l2_entries < h.guest_clusters) & (t[:, 1] + h.cluster_size > img.file_size)] if len(t) else t
    if len(t):
        i, off = (int(x) for x in t[0])
        raise CorruptImage(f"L2 table (L1 index {i}) at 0x{off:x} runs past the end of the file (0x{img.file_size:x})")


# ---- read -------------------------------------------------------------------------------------------
def cmd_read(args) -> int:
    from ..engine.file.chain import DataFiles, open_chain
    from ..engine.read.guest import read_guest

    offset, length = args.offset, args.length
    with open_chain(args.image, no_backing=args.no_backing, data_files=DataFiles.OPEN) as chain:
        _warn(chain.warnings)
        if offset > chain.size or offset + length > chain.size:
            raise QcowError(f"read 0x{offset:x}+0x{length:x} is past the end of the image (size {chain.size})")
        to_file = args.output not in (None, "-")  # `-o -`: standard output, as everywhere
        sink = open(args.output, "wb") if to_file else sys.stdout.buffer
        try:
            step = 16 << 20
            pos = offset
            while pos < offset + length:
                n = min(step, offset + length - pos)
                sink.write(read_guest(chain, pos, n))
                pos += n
        finally:
            if to_file:
                sink.close()
            else:
                sink.flush()
    return 0


def register(sub) -> None:
    def common(sp):
        sp.add_argument("image", metavar="IMAGE")
        sp.add_argument("--no-backing", action="store_true", help="inspect this layer alone, ignoring its backing file")

    sp = sub.add_parser("info", help="header, features, geometry and subcluster counts (qemu-img info and more)")
    common(sp)
    sp.add_argument("--backing-chain", action="store_true",
                    help="every image of the backing chain, top first (as qemu-img info --backing-chain)")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("map", help="guest extents as qemu-img map shows them, or per-cluster bitmaps")
    common(sp)
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.add_argument("--subclusters", action="store_true", help="print each allocated cluster's subcluster bitmap")
    sp.add_argument("--start-offset", type=size_arg, default=0, metavar="OFFSET",
                    help="the first guest offset to list (as qemu-img map)")
    sp.add_argument("--max-length", type=size_arg, default=None, metavar="LENGTH",
                    help="list at most LENGTH guest bytes from --start-offset (as qemu-img map)")
    sp.add_argument("--wide", action="store_true",
                    help="human output with Depth and Status columns, every extent (zero, unallocated, "
                         "compressed) listed; without it the columns are qemu-img map's, byte for byte")
    sp.set_defaults(func=cmd_map)

    sp = sub.add_parser("read", help="guest bytes, raw, to stdout or a file")
    common(sp)
    sp.add_argument("offset", type=size_arg, metavar="OFFSET")
    sp.add_argument("length", type=size_arg, metavar="LENGTH")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout ('-': stdout)")
    sp.set_defaults(func=cmd_read)
