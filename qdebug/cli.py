"""`qdebug` command line: thin views over engine objects, text or JSON, qemu-img-like exit codes.

Every error a user can cause ends as one line on stderr and a non-zero exit; Textual is imported
only by the commands that open the TUI, so the other commands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .engine.errors import QcowError

EXIT_ERROR = 1
EXIT_INTERNAL = 70


def _size(text: str) -> int:
    from .trace.syntax import SyntaxProblem, parse_size

    try:
        return parse_size(text)
    except SyntaxProblem as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def human_size(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    v = float(n)
    for u in units:
        if v < 1024 or u == units[-1]:
            return f"{n} B" if u == "B" else f"{v:.3g} {u}"
        v /= 1024
    return f"{n} B"


# ---- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .engine.file.chain import open_chain
    from .engine.read.summary import info_record

    with open_chain(args.image, no_backing=args.no_backing) as chain:
        rec = info_record(chain)
    _warn(rec["qdebug"]["warnings"])
    if args.output == "json":
        print(json.dumps(rec, indent=4))
        return 0
    q = rec["qdebug"]
    g = q["geometry"]
    fs = rec["format-specific"]["data"]
    lines = [
        f"image: {rec['filename']}",
        "file format: qcow2",
        f"virtual size: {human_size(rec['virtual-size'])} ({rec['virtual-size']} bytes)",
        f"disk size: {human_size(rec['actual-size'])}",
        f"cluster_size: {rec['cluster-size']}",
    ]
    if "backing-filename" in rec:
        lines.append(f"backing file: {rec['backing-filename']}")
        if "backing-filename-format" in rec:
            lines.append(f"backing file format: {rec['backing-filename-format']}")
    if "snapshots" in rec:
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<8}{'TAG':<17}{'VM SIZE':>10}  DATE")
        for s in rec["snapshots"]:
            lines.append(f"{s['id']:<8}{s['name']:<17}{s['vm-state-size']:>10}  {s['date-sec']}")
    lines.append("Format specific information:")
    lines.append(f"    compat: {fs['compat']}")
    lines.append(f"    compression type: {fs['compression-type']}")
    for key in ("lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"):
        if key in fs:
            val = fs[key]
            lines.append(f"    {key.replace('-', ' ')}: {str(val).lower() if isinstance(val, bool) else val}")
    lines.append("qdebug:")
    lines.append(f"    version: {q['version']}, header length: {q['header-length']}")
    feats = ", ".join(f"{f['name']} ({f['type']} bit {f['bit']})" for f in q["features"]) or "none"
    lines.append(f"    feature bits: {feats}")
    for e in q["extensions"]:
        lines.append(f"    header extension {e['type']} {e['name']}: {e['length']} bytes at 0x{e['offset']:x}")
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
    lines.append("    subclusters by type: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("\n".join(one_line(ln) for ln in lines))  # names from the image: no terminal escapes
    return 0


# ---- map ------------------------------------------------------------------------------------------
def cmd_map(args) -> int:
    from .engine.file.chain import open_chain
    from .engine.read.mapping import map_extents, write_json

    out = sys.stdout
    with open_chain(args.image, no_backing=args.no_backing) as chain:
        _warn(chain.warnings)
        if args.subclusters:
            return _map_subclusters(chain, out, args.output)
        if args.output == "json":
            write_json(chain, out)
            return 0
        out.write(f"{'Offset':<16}{'Length':<16}{'Depth':<6}{'Status':<12}{'Mapped to':<16}File\n")
        for batch in map_extents(chain):
            rows = []
            for s, ln, d, pr, z, da, ho, off, comp in zip(
                    batch.start.tolist(), batch.length.tolist(), batch.depth.tolist(), batch.present.tolist(),
                    batch.zero.tolist(), batch.data.tolist(), batch.has_offset.tolist(), batch.offset.tolist(),
                    batch.compressed.tolist()):
                status = ("compressed" if comp else "data") if da else ("zero" if pr else "unallocated")
                mapped = f"{off:#x}" if ho else "-"
                fname = one_line(chain.layers[d].path) if ho else "-"
                rows.append(f"{s:<#16x}{ln:<#16x}{d:<6}{status:<12}{mapped:<16}{fname}\n")
            out.write("".join(rows))
    return 0


def _map_subclusters(chain, out, output: str) -> int:
    """Each allocated cluster's L2 entry and bitmap string, streamed."""
    import numpy as np

    from .engine.format import constants as C
    from .engine.format.subclusters import bitmap_strings, classify
    from .engine.read.summary import iter_l2_batches

    img = chain.top
    h = img.header
    cs = h.cluster_size
    _refuse_tables_past_eof(img)
    for gcs, w0, bm in iter_l2_batches(img):
        w0 = np.asarray(w0, dtype=np.uint64)
        bmu = np.asarray(bm, dtype=np.uint64) if bm is not None else np.zeros(len(w0), dtype=np.uint64)
        nonempty = (w0 != 0) | (bmu != 0)
        if not nonempty.any():
            continue
        sel = np.flatnonzero(nonempty)
        types = classify(w0[sel], bmu[sel] if h.extended_l2 else None, extended=h.extended_l2)
        strings = bitmap_strings(types)
        rows = []
        for k, i in enumerate(sel.tolist()):
            g = int(gcs[i])
            word0 = int(w0[i])
            host = word0 & C.L2E_OFFSET_MASK if not word0 & C.QCOW_OFLAG_COMPRESSED else None
            if output == "json":
                rows.append(json.dumps({
                    "cluster": g, "start": g * cs, "l1-index": g // h.l2_entries, "l2-index": g % h.l2_entries,
                    "entry": f"0x{word0:016x}", "bitmap": f"0x{int(bmu[i]):016x}",
                    "host-offset": host, "copied": bool(word0 >> 63), "subclusters": strings[k]}) + "\n")
            else:
                hs = f"{host:#x}" if host is not None else "compressed"
                rows.append(f"{g * cs:<#16x}cluster {g:<10} {strings[k]}  {hs}\n")
        out.write("".join(rows))
    return 0


def _refuse_tables_past_eof(img) -> None:
    """The bitmap listing must not silently skip an L2 table it cannot read."""
    from .engine.errors import CorruptImage
    from .engine.read.summary import l2_table_offsets

    t = l2_table_offsets(img)
    h = img.header
    t = t[(t[:, 0] * h.l2_entries < h.guest_clusters) & (t[:, 1] + h.cluster_size > img.file_size)] if len(t) else t
    if len(t):
        i, off = (int(x) for x in t[0])
        raise CorruptImage(f"L2 table (L1 index {i}) at 0x{off:x} runs past the end of the file (0x{img.file_size:x})")


# ---- read -------------------------------------------------------------------------------------------
def cmd_read(args) -> int:
    from .engine.file.chain import open_chain

    offset, length = args.offset, args.length
    with open_chain(args.image, no_backing=args.no_backing) as chain:
        _warn(chain.warnings)
        if offset > chain.size or offset + length > chain.size:
            raise QcowError(f"read 0x{offset:x}+0x{length:x} is past the end of the image (size {chain.size})")
        sink = open(args.output, "wb") if args.output else sys.stdout.buffer
        try:
            step = 16 << 20
            pos = offset
            while pos < offset + length:
                n = min(step, offset + length - pos)
                sink.write(chain.read(pos, n))
                pos += n
        finally:
            if args.output:
                sink.close()
            else:
                sink.flush()
    return 0


def _warn(warnings) -> None:
    for w in warnings:
        print(f"qdebug: warning: {one_line(w)}", file=sys.stderr)


def one_line(text: str) -> str:
    """Messages quote names taken from the image (backing names may hold newlines or escapes):
    keep the promise of one line per message, whatever the name."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qdebug", description="Debugger for qcow2 images with subclusters.")
    p.add_argument("--version", action="version", version=f"qdebug {__import__('qdebug').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("image", metavar="IMAGE")
        sp.add_argument("--no-backing", action="store_true", help="inspect this layer alone, ignoring its backing file")

    sp = sub.add_parser("info", help="header, features, geometry and subcluster counts (qemu-img info and more)")
    common(sp)
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("map", help="guest extents as qemu-img map shows them, or per-cluster bitmaps")
    common(sp)
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.add_argument("--subclusters", action="store_true", help="print each allocated cluster's subcluster bitmap")
    sp.set_defaults(func=cmd_map)

    sp = sub.add_parser("read", help="guest bytes, raw, to stdout or a file")
    common(sp)
    sp.add_argument("offset", type=_size, metavar="OFFSET")
    sp.add_argument("length", type=_size, metavar="LENGTH")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    sp.set_defaults(func=cmd_read)

    _register_more(sub)
    return p


def _register_more(sub) -> None:
    """Subcommands from other modules (write side, check, TUI) register here."""
    import importlib

    for mod in ("qdebug.cli_write", "qdebug.cli_check", "qdebug.cli_tui"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(sub)


def main(argv: list[str] | None = None) -> int:
    # numpy's OpenBLAS starts a busy thread per core at import (~0.1 s of CPU at start, and it
    # competes with the one that works); qdebug does no linear algebra
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    exiting = argv is None  # called as the program (console script or -m), not from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and os.path.isfile(argv[0]) and argv[0] not in parser._subparsers._group_actions[0].choices:
        argv = ["tui", *argv]  # `qdebug IMAGE [--trace T]` opens the debugger
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except QcowError as e:
        print(f"qdebug: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qdebug: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("qdebug: error: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        if os.environ.get("QDEBUG_DEBUG"):
            raise
        print(f"qdebug: internal error: {type(e).__name__}: {e} (set QDEBUG_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if exiting:  # the interpreter's last collection would walk every object numpy made (~30 ms)
            import gc

            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
