"""Hex view of guest bytes, each byte coloured by the layer it comes from (Line API).

Also used for repair previews: `changed` marks bytes that differ from a second buffer.
"""

from __future__ import annotations

import numpy as np
from rich.style import Style
from textual.strip import Strip

from .model import READS_DATA, READS_INVALID, Source
from .rows import RowView, segments


class HexView(RowView):
    COMPONENT_CLASSES = {
        "hexview--offset", "hexview--this", "hexview--backing", "hexview--zero", "hexview--invalid",
        "hexview--changed", "hexview--cursor",
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        self.base_offset = 0
        self.data = b""
        self.src = np.zeros(0, dtype=np.uint8)
        self.changed_mask = np.zeros(0, dtype=bool)
        self.per_row = 16

    def on_resize(self) -> None:  # (RowView's on_resize runs too: Textual calls each class's handler)
        per = 16 if self.scrollable_content_region.width >= 8 + 2 + 16 * 3 + 2 + 16 else 8
        if per != self.per_row:
            self.per_row = per
            self._layout()

    def _layout(self) -> None:
        per = self.per_row
        self.set_rows(-(-len(self.data) // per), 8 + 2 + per * 3 + 2 + per, keep_cursor=False)

    def show(self, offset: int, data: bytes, sources: tuple[Source, ...] = (),
             other: bytes | None = None) -> None:
        """Bytes at guest `offset`; `sources` colour them; bytes differing from `other` are marked."""
        self.base_offset = offset
        self.data = data
        src = np.zeros(len(data), dtype=np.uint8)  # 0 this image, 1 backing, 2 zeros, 3 invalid
        for s in sources:
            code = 3 if s.reads == READS_INVALID else 2 if s.reads != READS_DATA else 1 if s.depth else 0
            src[s.start - offset:s.end - offset] = code
        self.src = src
        if other is not None and len(other) == len(data):
            self.changed_mask = np.frombuffer(data, np.uint8) != np.frombuffer(other, np.uint8)
        else:
            self.changed_mask = np.zeros(len(data), dtype=bool)
        self._layout()
        self.scroll_to(y=0, animate=False, force=True)

    def render_row(self, index: int, cursor: bool) -> Strip:
        per = self.per_row
        a = index * per
        chunk = self.data[a:a + per]
        names = ("hexview--this", "hexview--backing", "hexview--zero", "hexview--invalid")
        styles = [self.style_of(n) for n in names]
        changed = self.style_of("hexview--changed")
        cur = self.style_of("hexview--cursor") if cursor and self.has_focus else Style()
        parts = [(f"{self.base_offset + a:08x}  ", self.style_of("hexview--offset") + cur)]
        text = []
        for k, b in enumerate(chunk):
            st = styles[self.src[a + k]] + cur
            if self.changed_mask[a + k]:
                st = st + changed
            unreadable = self.src[a + k] == 3  # QEMU fails the read (EIO): no byte to show, in either column
            hx = "??" if unreadable else f"{b:02x}"
            parts.append((hx, st))
            parts.append((" " if k != 7 else "  ", cur))
            ch = "?" if unreadable else chr(b) if 32 <= b < 127 else "."
            text.append((ch, st))
        parts.append(("   " * (per - len(chunk)) + (" " if len(chunk) <= 8 else ""), cur))
        parts.extend(text)
        return Strip(segments(parts))
