"""qdebug's colours, as CSS variables derived from whatever Textual theme is active.

Every panel draws with these (`$qd-data`, `$qd-zero`...) or with Textual's own variables, never
with a literal colour, so a light theme, a dark one and the user's own all stay readable. They
start from the theme's `text-*` colours and are then darkened (light themes) or lightened (dark
ones) until they reach a WCAG contrast of 4.5 on every background a row can have: the screen,
the panels, and the cursor rows (`qd-cursor`, a tint of the theme's primary colour).
"""

from __future__ import annotations

from textual.color import Color

MIN_CONTRAST = 4.5  # WCAG AA for normal text


def luminance(c: Color) -> float:
    def channel(v: int) -> float:
        s = v / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(c.r) + 0.7152 * channel(c.g) + 0.0722 * channel(c.b)


def contrast(a: Color, b: Color) -> float:
    """WCAG contrast ratio of two opaque colours (1 to 21)."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def legible(c: Color, backgrounds: list[Color], *, dark: bool) -> Color:
    """`c`, lightened on a dark theme or darkened on a light one, until it reads on every background."""
    for _ in range(25):
        if min(contrast(c, b) for b in backgrounds) >= MIN_CONTRAST:
            break
        c = c.lighten(0.03) if dark else c.darken(0.03)
    return c


def qdebug_variables(theme: dict[str, str]) -> dict[str, str]:
    """The qd-* variables for a theme's generated variables (`App.get_css_variables`)."""

    def color(name: str) -> Color:
        return Color.parse(theme[name])

    background = color("background")
    dark = background.brightness < 0.5
    cursor = color("surface").blend(color("primary"), 0.2)
    backgrounds = [background, color("surface"), color("panel"), color("panel-lighten-1"), cursor]
    base = {
        "qd-data": color("text-success"),  # bytes this image holds
        "qd-zero": color("text-primary"),  # reads as zeros
        "qd-backing": color("text-warning"),  # answered by a backing file
        "qd-backing-zero": color("text-secondary"),  # zeros a backing file answers
        "qd-compressed": color("text-primary").blend(color("text-error"), 0.5),
        "qd-error": color("text-error"),  # error text (an error *background* is $error)
        "qd-warning": color("text-warning"),
        "qd-shared": color("text-accent"),  # a cluster shared with a snapshot (no COPIED)
        "qd-muted": color("foreground").blend(background, 0.35),  # offsets, pending steps, free clusters
        "qd-metadata": color("text-accent"),  # header, L1 and L2 tables in the host view
        "qd-refcount": color("text-secondary"),  # refcount structures, snapshot and bitmap tables
    }
    out = {name: legible(c, backgrounds, dark=dark).hex for name, c in base.items()}
    out["qd-cursor"] = cursor.hex
    error = color("error")  # an invalid entry's background: black or white on it, whichever reads
    out["qd-on-error"] = max((Color(0, 0, 0), Color(255, 255, 255)), key=lambda c: contrast(c, error)).hex
    return out
