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


class FatalCorruption(CorruptImage):
    """What QEMU reports through qcow2_signal_corruption(fatal): the request fails with EIO and,
    on an image open read-write, the corrupt bit is set and the image is unusable until reopened
    (a read-only image, such as a backing file, only fails the request). `image`: the file."""

    def __init__(self, message: str, image: str | None = None):
        super().__init__(message)
        self.image = image


class InvalidEntry(FatalCorruption):
    """An L2 entry QEMU's reads refuse: an invalid subcluster bitmap or an unaligned host offset."""

    def __init__(self, message: str, l2_offset: int, l2_index: int, image: str | None = None):
        super().__init__(message, image)
        self.l2_offset = l2_offset
        self.l2_index = l2_index


class BackingError(QcowError):
    """Backing chain problems: missing files, loops, refused names."""


class DataFileError(QcowError):
    """An external data file that cannot or may not be opened (QEMU fails the open too)."""


class StorageError(QcowError):
    """The operating system refused a read or a write: the disk is full, the file system read-only,
    the device failing. Keeps `errno` and prints as what it is ("No space left on device"), with
    the file and the place, so callers can fail a command the way qemu-io does."""

    def __init__(self, errno: int, path: str, what: str):
        import os

        self.errno = errno
        self.strerror = os.strerror(errno)
        self.path = path
        self.what = what
        super().__init__(f"{path}: {what}: {self.strerror}")
