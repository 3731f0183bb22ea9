"""The what-if chart: per geometry, the host bytes a trace writes by kind (guest data, avoidable
COW, the rest of the COW, metadata) and the file size after it; an SVG or PNG drawn with
matplotlib, and the same bars in the terminal."""

from __future__ import annotations

import os

from ..engine.errors import QcowError
from .common import human_size

KINDS = ("guest data", "COW (needed)", "COW (avoidable)", "metadata")
_COLOURS = ("#4c72b0", "#dd8452", "#c44e52", "#8172b3")
_MARKS = ("█", "▓", "▒", "░")


def _parts(row) -> tuple[int, int, int, int]:
    t = row.cost.total
    guest = t.host_data_bytes - t.cow_bytes
    return guest, t.cow_bytes - t.cow_avoidable_bytes, t.cow_avoidable_bytes, t.metadata_bytes


def check_chart_path(path: str) -> None:
    """Refused before any planning: an unknown extension, or a folder that is not there."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png"):
        raise QcowError(f"{path}: a chart is an .svg or a .png file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise QcowError(f"{path}: no such directory {folder}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QcowError("--chart needs matplotlib (pip install 'qdebug[chart]')") from None


def save_chart(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in rows]
    parts = [_parts(r) for r in rows]
    mib = float(1 << 20)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    bottom = [0.0] * len(rows)
    for k, (kind, colour) in enumerate(zip(KINDS, _COLOURS)):
        values = [p[k] / mib for p in parts]
        ax1.bar(labels, values, bottom=bottom, label=kind, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax1.set_title("host bytes written")
    ax1.set_ylabel("MiB")
    ax1.legend(fontsize="small")
    ax2.bar(labels, [r.cost.total.file_size_after / mib for r in rows], color="#55a868")
    ax2.set_title("file size after the trace")
    ax2.set_ylabel("MiB")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    try:
        fig.savefig(path, metadata={"Date": None} if path.lower().endswith(".svg") else None)
    except OSError as e:
        raise QcowError(f"{path}: cannot write the chart: {e.strerror}") from None
    finally:
        plt.close(fig)


def terminal_chart(rows, width: int = 48) -> str:
    """The same bars as text: host bytes by kind, then file size, scaled to the largest."""
    parts = [_parts(r) for r in rows]
    top = max((sum(p) for p in parts), default=0) or 1
    ftop = max(r.cost.total.file_size_after for r in rows) or 1
    name = max(len(r.label) for r in rows)
    out = ["host bytes written: " + "  ".join(f"{m} {k}" for m, k in zip(_MARKS, KINDS))]
    for r, p in zip(rows, parts):
        bar = "".join(m * round(v * width / top) for m, v in zip(_MARKS, p))
        out.append(f"  {r.label.ljust(name)} {bar} {human_size(sum(p))}")
    out.append("file size after the trace:")
    for r in rows:
        f = r.cost.total.file_size_after
        out.append(f"  {r.label.ljust(name)} {'█' * round(f * width / ftop)} {human_size(f)}")
    return "\n".join(out)
