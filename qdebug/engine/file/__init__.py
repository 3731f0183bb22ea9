"""Files on disk: an image's mmap and tables, the backing chain, QEMU's image locks, the undo
journal. Knows the format (`engine.format`); knows nothing of guest reads or writes."""
