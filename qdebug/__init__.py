"""qdebug: an interactive debugger for qcow2 images with extended L2 entries (subclusters)."""

__version__ = "0.1.0"
