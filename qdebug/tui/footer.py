"""A footer whose essential keys always fit: when the shown bindings are wider than the terminal,
the least important ones go (from the end), never Help and Quit; the palette key only if even
that is not enough. Recomposed on every resize."""

from __future__ import annotations

from textual.widgets import Footer
from textual.widgets._footer import FooterKey

ESSENTIAL = frozenset({"help", "quit"})


def key_width(key: FooterKey, compact: bool) -> int:
    """Cells a FooterKey takes: key, description, padding and the gap after it (Footer's CSS)."""
    if compact:
        return len(key.key_display) + (1 + len(key.description) if key.description else 0) + 1
    return len(key.key_display) + 2 + (len(key.description) + 1 if key.description else 0) + 1


class FitFooter(Footer):
    def compose(self):
        items = list(super().compose())
        width = self.app.size.width
        keys = [k for k in items if isinstance(k, FooterKey) and not k.has_class("-command-palette")]
        palette = [k for k in items if isinstance(k, FooterKey) and k.has_class("-command-palette")]
        others = [k for k in items if not isinstance(k, FooterKey)]  # binding-group labels (none here)

        def total() -> int:
            return sum(key_width(k, self.compact) for k in keys + palette) + (2 if palette else 0)

        for k in reversed(list(keys)):
            if total() <= width:
                break
            if k.action not in ESSENTIAL:
                keys.remove(k)
        if total() > width:
            palette.clear()
        yield from keys
        yield from others
        yield from palette
