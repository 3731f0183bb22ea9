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


def register(sub) -> None:
    sp = sub.add_parser("layout", help="who owns every host cluster: metadata, data, leaked, free, overlaps")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--output", choices=("human", "json"), default="human")
    sp.add_argument("--no-guess", action="store_true",
                    help="do not read unreferenced clusters to guess their content")
    sp.set_defaults(func=cmd_layout)
