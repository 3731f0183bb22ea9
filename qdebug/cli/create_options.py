"""`qdebug create -o ...`: qemu-img 7.2's option list for qcow2, parsed as QemuOpts parses it, and
the "Formatting ..." line qemu-img prints for it.

The options are qcow2's and file-posix's, in the order qemu-img merges and prints them. Values:
sizes as qemu_strtosz reads them (`64k`, `0x10000`, `1.5M`), numbers as strtoull base 0 (`010` is
8), booleans `on|yes|true|y` / `off|no|false|n` (a bare `key` is `key=on`, `nokey` is `key=off`),
`,,` for a comma inside a value; a later `key=` wins. The line echoes booleans and strings as
written and numbers as values, with the defaults qemu-img shows (qdebug's own default is
extended_l2=on). Encryption and external data files are refused: qdebug writes neither (it reads
images with an external data file: info, map, check, read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.errors import QcowError

SIZE, NUMBER, BOOL, STRING = "size", "number", "bool", "string"
# (name, type, default shown when unset, help) in qemu-img 7.2's order
OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("encryption", BOOL, None, "Encrypt the image with format 'aes' (refused unless off)"),
    ("encrypt.format", STRING, None, "Encrypt the image (refused)"),
    ("encrypt.key-secret", STRING, None, "ID of secret providing qcow AES key or LUKS passphrase (refused)"),
    ("encrypt.cipher-alg", STRING, None, "Name of encryption cipher algorithm (refused)"),
    ("encrypt.cipher-mode", STRING, None, "Name of encryption cipher mode (refused)"),
    ("encrypt.ivgen-alg", STRING, None, "Name of IV generator algorithm (refused)"),
    ("encrypt.ivgen-hash-alg", STRING, None, "Name of IV generator hash algorithm (refused)"),
    ("encrypt.hash-alg", STRING, None, "Name of encryption hash algorithm (refused)"),
    ("encrypt.iter-time", NUMBER, None, "Time to spend in PBKDF in milliseconds (refused)"),
    ("cluster_size", SIZE, "65536", "qcow2 cluster size"),
    ("extended_l2", BOOL, "off", "Extended L2 tables (qdebug: on unless off)"),
    ("preallocation", STRING, None, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("compression_type", STRING, "zlib", "Compression method used for image cluster compression"),
    ("size", SIZE, None, "Virtual disk size"),
    ("compat", STRING, None, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("backing_file", STRING, None, "File name of a base image"),
    ("backing_fmt", STRING, None, "Image format of the base image"),
    ("data_file", STRING, None, "File name of an external data file (refused)"),
    ("data_file_raw", BOOL, None, "The external data file must stay valid as a raw image (refused unless off)"),
    ("lazy_refcounts", BOOL, "off", "Postpone refcount updates"),
    ("refcount_bits", NUMBER, "16", "Width of a reference count entry in bits"),
    ("nocow", BOOL, None, "Turn off copy-on-write (valid only on btrfs)"),
    ("extent_size_hint", SIZE, None, "Extent size hint for the image file, 0 to disable"),
)
_TYPES = {name: kind for name, kind, _d, _h in OPTIONS}
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


@dataclass
class CreateOptions:
    """The -o options as given (spelled as typed, for the Formatting line) and as values."""

    text: dict[str, str] = field(default_factory=dict)
    values: dict[str, object] = field(default_factory=dict)

    def get(self, name: str, default=None):
        return self.values.get(name, default)


def options_help() -> str:
    rows = [f"  {name}=<{'bool (on/off)' if kind == BOOL else 'str' if kind == STRING else 'num' if kind == NUMBER else kind}>"
            f" - {help_}" for name, kind, _d, help_ in sorted(OPTIONS)]
    return "Supported qcow2 options:\n" + "\n".join(rows)


def _split(text: str) -> list[str]:
    """QemuOpts' list: items separated by ',', a ',,' is a comma in the value."""
    if text.startswith(",") or (text.endswith(",") and not text.endswith(",,")):
        raise QcowError(f"Invalid option list: {text}")
    items, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    return items


def _size(name: str, value: str) -> int:
    from ..trace.syntax import strtosz64

    n = strtosz64(value)
    if n < 0:
        raise QcowError(f"Parameter '{name}' expects a non-negative number below 2^64 "
                        "(optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes)")
    return n


def _number(name: str, value: str) -> int:
    from ..trace.syntax import strtol

    n = strtol(value)
    if n is None or value == "":
        raise QcowError(f"Parameter '{name}' expects a number")
    if abs(n) >= 1 << 64:
        raise QcowError(f"Value '{value}' is too large for parameter '{name}'")
    return n % (1 << 64)


def parse_create_options(texts: list[str] | str | None) -> CreateOptions:
    """Every -o of the command line, in order, into one CreateOptions (qemu-img's messages)."""
    opts = CreateOptions()
    for text in [texts] if isinstance(texts, str) else texts or []:
        for item in _split(text):
            key, sep, value = item.partition("=")
            if not sep:  # a bare key is key=on; nokey is key=off
                key, value = (key[2:], "off") if key.startswith("no") and key[2:] in _TYPES else (key, "on")
            kind = _TYPES.get(key)
            if kind is None:
                raise QcowError(f"Invalid parameter '{key}'")
            if kind == BOOL:
                if value not in _TRUE + _FALSE:
                    raise QcowError(f"Parameter '{key}' expects 'on' or 'off'")
                parsed: object = value in _TRUE
            elif kind == SIZE:
                parsed = _size(key, value)
            elif kind == NUMBER:
                parsed = _number(key, value)
            else:
                parsed = value
            opts.text[key] = value
            opts.values[key] = parsed
    return opts


def refuse_unsupported(opts: CreateOptions) -> None:
    """What qdebug cannot create (it could not read such an image either)."""
    if opts.get("encryption") or any(k.startswith("encrypt.") for k in opts.values):
        raise QcowError("encryption: qdebug does not create (or read) encrypted qcow2 images; use qemu-img create")
    if "data_file" in opts.values or opts.get("data_file_raw"):
        raise QcowError("data_file: qdebug does not create images with an external data file (it reads them: "
                        "info, map, check, read); use qemu-img create")


def formatting_line(path: str, opts: CreateOptions) -> str:
    """The line qemu-img create prints: every option with a value or a default, in its order."""
    words = []
    for name, kind, default, _h in OPTIONS:
        if name in opts.values:
            value = opts.values[name]
            shown = str(value) if kind in (SIZE, NUMBER) else opts.text[name]
        elif default is not None:
            shown = default
        else:
            continue
        if kind == STRING:
            shown = shown.replace(",", ",,")
        words.append(f"{name}={shown}")
    return f"Formatting '{path}', fmt=qcow2 " + " ".join(words)


def compat_version(opts: CreateOptions) -> int:
    value = opts.text.get("compat")
    if value is None:
        return 3
    if value not in _COMPAT:
        raise QcowError(f"Parameter 'version' does not accept value '{value}'")
    return _COMPAT[value]
