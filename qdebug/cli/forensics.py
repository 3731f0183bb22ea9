"""`qdebug layout | salvage | bundle`: broken-image forensics (engine.forensics), printed."""

from __future__ import annotations

import sys

from .common import human_size, one_line


def _layout_text(lay, out) -> None:
    from ..engine.forensics.layout_format import iter_text

    for piece in iter_text(lay):
        out.write(piece)
    if len(lay.problems):
        out.write("\nproblems:\n")
        for j in range(len(lay.problems)):
            out.write(one_line(lay.problem_text(j)) + "\n")
    s = lay.summary()
    out.write("\nsummary:\n")
    for k, v in sorted(s.bytes_by_kind.items(), key=lambda kv: -kv[1]):
        out.write(f"    {k:<17}{human_size(v):>10}  ({v} bytes)\n")
    for k, v in s.bytes_by_guess.items():
        out.write(f"    unreferenced content that looks like {k}: {human_size(v)} ({v} bytes)\n")
    if s.data_clusters:
        frag = 100.0 * (s.data_runs - 1) / s.data_clusters if s.data_clusters > 1 else 0.0
        out.write(f"    data: {s.data_clusters} clusters in {s.data_runs} host runs ({frag:.2f}% fragmented)\n")
    out.write(f"    image end offset: {s.image_end_offset} of a {s.file_size}-byte file\n")
    out.write(f"    a compacted copy would save {human_size(s.compaction_win)} ({s.compaction_win} bytes)\n")
    for p, n in s.problems.items():
        out.write(f"    problems: {n} {p}\n")
    for note in lay.notes:
        out.write(f"    note: {one_line(note)}\n")


def cmd_layout(args) -> int:
    from ..engine.forensics.layout import host_layout

    lay = host_layout(args.image, guesses=not args.no_guess)
    out = sys.stdout
    if args.output == "json":
        for piece in lay.iter_json():
            out.write(piece)
    else:
        _layout_text(lay, out)
    return 0


def _policy(confine: bool):
    from ..engine.file.chain import BackingPolicy

    return BackingPolicy.from_env(confine=confine)  # with --backing-dir / --allow-backing (cli.main sets them)


def cmd_salvage(args) -> int:
    import json

    from ..engine.forensics.salvage_run import salvage

    res = salvage(args.image, args.output, out_format=args.output_format, orphans_dir=args.orphans,
                  force_share=args.force_share, policy=_policy(confine=True))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(res.to_json(), f, indent=1)
            f.write("\n")
    t = res.totals()
    out = sys.stdout
    size = res.virtual_size

    def pct(n: int) -> str:
        return f"{100.0 * n / size:.2f}%" if size else "-"

    out.write(f"{res.image}: {human_size(size)} guest disk salvaged"
              + (f" to {res.output} ({res.output_format})" if res.output else " (analysis only: no -o)") + "\n")
    out.write(f"    recovered {t['recovered']:>16} bytes ({pct(t['recovered'])})\n")
    for src in t["recovered-by-source"]:
        layer = f" ({src['file']})" if src["depth"] else ""
        out.write(f"        {src['bytes']:>20}  from {one_line(src['source'] + layer)}\n")
    out.write(f"    zero      {t['zero']:>16} bytes ({pct(t['zero'])}), by the image's own metadata\n")
    for z in t["zero-by-why"]:
        out.write(f"        {z['bytes']:>20}  {z['why']}\n")
    out.write(f"    lost      {t['lost']:>16} bytes ({pct(t['lost'])})" + (" (zeros in the output)" if t["lost"] else "")
              + "\n")
    for lost in t["lost-by-reason"]:
        out.write(f"        {lost['bytes']:>20}  {one_line(lost['reason'])}\n")
    if res.evidence:
        out.write(f"    orphaned guest data: {res.evidence} cluster(s) no table maps any more (their guest offsets are "
                  "unknown)" + (f": saved in {args.orphans}" if args.orphans else "; save them with --orphans DIR")
                  + "\n")
    elif res.orphans and args.orphans:
        out.write(f"    {len(res.orphans)} unreferenced cluster(s) with content saved in {args.orphans}\n")
    if res.files:
        out.write("    data came from: " + ", ".join(one_line(f) for f in res.files) + "\n")
    for n in res.notes:
        out.write(f"    note: {one_line(n)}\n")
    return res.exit_code


def cmd_bundle(args) -> int:
    from ..engine.forensics.bundle import make_bundle

    res = make_bundle(args.image, args.output)
    rm = res.info["removed"]
    print(f"{res.path}: metadata-only bundle of {args.image}: {human_size(res.metadata_bytes)} of metadata kept byte "
          f"for byte; removed {rm['data-clusters']} data cluster(s), {rm['compressed-clusters']} compressed "
          f"cluster(s) (zeroed in place), {rm['unreferenced-clusters']} unreferenced cluster(s) of guest data; "
          f"kept {res.kept_unreferenced_clusters} unreferenced cluster(s) that look like metadata")
    print(f"    marked as a bundle in: {one_line(res.marker)} (`qdebug info` shows it)")
    if res.info["metadata-preallocated"] and res.info["data-holes"] is None:
        print("    note: the original's data clusters have too many holes to record: `map` on the bundle reports "
              "them as data where qemu-img map on the original reports zeros")
    return 0


def register(sub) -> None:
    sp = sub.add_parser("layout", help="who owns every host cluster: metadata, data, leaked, free, overlaps")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.add_argument("--no-guess", action="store_true",
                    help="do not read unreferenced clusters to guess their content")
    sp.set_defaults(func=cmd_layout)

    sp = sub.add_parser("salvage", help="get the guest disk out of a broken image; say what is recovered, zero, lost "
                                        "(exit 0: nothing lost, 1: something lost, 2: error)")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("-o", dest="output", metavar="OUT", help="write the guest disk there (lost ranges as zeros)")
    sp.add_argument("-O", dest="output_format", choices=("raw", "qcow2"), default="raw")
    sp.add_argument("--report", metavar="REPORT.json", help="every guest range with its status and origin, as JSON")
    sp.add_argument("--orphans", metavar="DIR", help="save every unreferenced cluster holding something there")
    sp.add_argument("-U", "--force-share", action="store_true", help="open the image even if another process "
                                                                     "(a running QEMU) holds it")
    sp.set_defaults(func=cmd_salvage, error_exit=2)

    sp = sub.add_parser("bundle", help="a metadata-only copy of an image (no guest data) to hand over for debugging")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("-o", dest="output", metavar="OUT.qcow2", required=True)
    sp.set_defaults(func=cmd_bundle)
