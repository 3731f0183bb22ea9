"""The `qdebug` command (console script `qdebug.cli:main`)."""

from .main import main

__all__ = ["main"]
