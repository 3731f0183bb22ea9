"""qdebug's colours, as CSS variables derived from whatever Textual theme is active.

Every panel draws with these (`$qd-data`, `$qd-zero`...) or with Textual's own variables, never
with a literal colour, so a light theme, a dark one and the user's own all stay readable. They
come from the theme's `text-*` colours, which Textual makes legible on the theme's background;
`qd-compressed` (no theme has a colour for it) is a mix of two of them.
"""

from __future__ import annotations

from textual.color import Color


def qdebug_variables(theme: dict[str, str]) -> dict[str, str]:
    """The qd-* variables for a theme's generated variables (`App.get_css_variables`)."""

    def mix(a: str, b: str) -> str:
        return Color.parse(theme[a]).blend(Color.parse(theme[b]), 0.5).hex

    return {
        "qd-data": theme["text-success"],  # bytes this image holds
        "qd-zero": theme["text-primary"],  # reads as zeros
        "qd-backing": theme["text-warning"],  # answered by a backing file
        "qd-backing-zero": theme["text-secondary"],  # zeros a backing file answers
        "qd-compressed": mix("text-primary", "text-error"),
        "qd-error": theme["text-error"],  # error text (an error *background* is $error)
        "qd-warning": theme["text-warning"],
        "qd-shared": theme["text-accent"],  # a cluster shared with a snapshot (no COPIED)
    }
