"""`qemu-img check` rebuilt (findings, counts, exit codes) and repair plans on top of it: the top
layer of the engine, free to use everything below."""
