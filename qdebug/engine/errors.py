"""Errors a user can cause: each names the problem and its place in the image."""

from __future__ import annotations


class QcowError(Exception):
    """Base of every error qdebug reports as one line (never a traceback)."""


class NotQcow2(QcowError):
    pass


class UnsupportedFeature(QcowError):
    """A feature qdebug does not implement: refusing beats a wrong answer."""


class CorruptImage(QcowError):
    """Metadata QEMU would also reject or flag as corruption."""


class InvalidEntry(CorruptImage):
    """An L2 entry whose subcluster bitmap is invalid (QEMU returns EIO)."""

    def __init__(self, message: str, l2_offset: int, l2_index: int):
        super().__init__(message)
        self.l2_offset = l2_offset
        self.l2_index = l2_index


class BackingError(QcowError):
    """Backing chain problems: missing files, loops, refused names."""
