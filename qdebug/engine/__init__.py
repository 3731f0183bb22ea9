"""The qcow2 engine: no Textual or Rich import, ever (the TUI and CLI are views over it)."""

from .chain import Chain, open_chain
from .errors import BackingError, CorruptImage, InvalidEntry, NotQcow2, QcowError, UnsupportedFeature
from .image import Image, open_image
from .subclusters import SubclusterType

__all__ = ["Chain", "open_chain", "Image", "open_image", "SubclusterType", "QcowError", "CorruptImage",
           "InvalidEntry", "NotQcow2", "UnsupportedFeature", "BackingError"]
