"""The on-disk format, as the qcow2 spec spells it: constants, the header, L2 entries and their
subcluster bitmaps, compressed cluster descriptors and codecs, refcount entry codecs.

The bottom layer: pure functions of bytes and integers, no file access."""

from ... import native

native.enable("engine.format", __path__)  # compiled when built from exactly this source
