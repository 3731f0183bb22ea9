"""The qcow2 engine: no Textual or Rich import, ever (the TUI and CLI are views over it).

The names below load their module on first use: importing one light submodule (`errors`, as
every CLI command does) must not pay for numpy and the whole reader."""

import importlib

_WHERE = {"Chain": "file.chain", "open_chain": "file.chain", "Image": "file.image", "open_image": "file.image",
          "SubclusterType": "format.subclusters", "QcowError": "errors", "CorruptImage": "errors",
          "InvalidEntry": "errors", "NotQcow2": "errors", "UnsupportedFeature": "errors", "BackingError": "errors"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
