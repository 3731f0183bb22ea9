"""QEMU 7.2's write path: guest operations (`ops`), the step context and its transaction, the
allocator, data writes with COW, zero writes, discards, compressed writes, the write engine and
the frozen plans it records. Builds on `engine.read` (COW sources), `engine.file` and `engine.format`."""

from ... import native

native.enable("engine.write", __path__)  # compiled when built from exactly this source
