"""Write traces in qemu-io command syntax, and sessions that step through them."""

from .. import native

native.enable("trace", __path__)  # the compiled parser, when built from exactly this source
