"""Write traces in qemu-io command syntax, and sessions that step through them."""
