"""The guest's view, read-only: block status through the backing chain, guest reads, `map`
extents, whole-image summaries. Builds on `engine.file` and `engine.format`."""

from ... import native

native.enable("engine.read", __path__)  # compiled when built from exactly this source
