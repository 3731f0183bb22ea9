"""`qemu-img check FILE` from the outside: how a file is opened for a check, the one way
`qdebug check` and `qdebug scan` both check an image file.

QEMU opens the image and its backing chain read-only and takes a reader's locks on each file (it
holds "consistent read" and refuses to share "write" and "resize"), so an image a running QEMU
writes to, or a backing file one writes to, is refused with "Failed to get shared "write" lock";
`-U` (force share) checks it anyway, holding "consistent read" only (as qemu-img check -U).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from ..errors import BackingError
from ..file.chain import BackingPolicy, DataFiles, attach_data_file, open_chain
from ..file.image import Image, open_image
from ..file.locking import READER, SHARING, lock_files
from .checker import CheckReport, check_image


@contextmanager
def checked_file(path: str, *, force_share: bool = False, progress=None,
                 keep_references: bool = True) -> Iterator[tuple[Image, CheckReport]]:
    """(image, report) of the image file at `path`, checked as `qemu-img check [-U] path` does (no
    repair), the report named after `path` as given; the image stays open (and locked) inside the
    block, for whoever reads more of it. Raises QcowError when the file cannot be opened as qcow2,
    or `ImageInUse` when a writer holds it and `force_share` is off."""
    held = lock_files(path, perms=SHARING if force_share else READER)  # first, as QEMU: before the header
    try:
        with open_image(path, external_data=True) as img:
            # qemu-img check opens the chain and each data file (a missing one fails the check),
            # though it reads one layer's metadata only
            if img.header.backing_file:
                _chain_opens(path)
            else:
                attach_data_file(img, path, BackingPolicy.from_env())
            report = check_image(img, progress=progress)
            yield img, replace(report, filename=path, references=report.references if keep_references else None)
    finally:
        held.release()


def _chain_opens(path: str) -> None:
    """qemu-img check opens the whole backing chain before it checks anything, so a missing or
    refused backing file fails the check (exit 1) although the check reads one layer only."""
    try:
        open_chain(path, data_files=DataFiles.OPEN).close()
    except BackingError as e:
        why = str(e).replace(" (use --no-backing to inspect this layer alone)", "")
        raise BackingError(f"{why}: cannot check the image without it (qemu-img check fails alike)") from None


def check_file(path: str, *, force_share: bool = False, progress=None, keep_references: bool = True) -> CheckReport:
    """The report of `checked_file`, the image closed again."""
    with checked_file(path, force_share=force_share, progress=progress, keep_references=keep_references) as (_, r):
        return r
