"""`salvage`: the guest disk out of a broken image, as far as it can be known, and a report that
says for every byte whether it is recovered (and from where), zero by the image's own metadata,
or lost (and why).

The image is only read (O_RDONLY, a shared read lock like `qemu-img convert`'s, or none with
force-share), whatever its corrupt bit says. Each qcow2 layer is analysed on its own
(salvage.analyse_layer); ranges a layer leaves unallocated come from the backing file, which
is followed only inside the image's directory tree unless the policy widens it (a skipped or
missing backing file makes those ranges lost, with the reason). The output is written to a
temporary file beside OUT and renamed at the end: no half-written OUT. Compressed clusters are
decompressed while writing; one that does not decompress becomes lost there.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import BackingError, QcowError
from ..file.chain import BackingPolicy, BackingRefused, RawFile, probe_format, resolve_backing_path, show_name
from ..file.locking import READER, SHARING, ImageLock, opening, release_all
from ..format.compression import decompress, descriptor_fields
from .guess import GUESS_NAMES
from .salvage import S_COMPRESSED, S_DATA, S_FALL, S_LOST, S_ZERO, GuestRuns, LayerMap, analyse_layer
from .sinks import Qcow2Sink, RawSink
from .source import ImageFile
from .validate import REASON_TEXT, Reason

ZERO_FLAG, ZERO_UNALLOCATED, ZERO_PAST_BACKING = 0, 1, 2
ZERO_WHY = ("zero-flag", "unallocated", "past-backing-end")
_DYNAMIC = 1000  # reason codes from here on index `Salvage.texts` (backing file problems)
_CHUNK = 8 << 20


@dataclass
class _Layer:
    path: str
    file: ImageFile | RawFile
    map: LayerMap | None  # None: a raw file
    below: "_Layer | None" = None
    below_reason: int = 0  # when no layer below serves its unallocated ranges: 0 zeros, else lost


@dataclass
class Salvage:
    """The result: guest runs over the whole virtual disk with their status and origin."""

    image: str
    virtual_size: int
    runs: GuestRuns
    layers: list[str]  # path per depth
    texts: list[str]  # reason texts of codes >= _DYNAMIC
    notes: list[str]
    orphans: list[dict]
    evidence: int  # unreferenced guest-data clusters of unknown position
    output: str | None = None
    output_format: str | None = None
    files: list[str] = field(default_factory=list)

    def reason_text(self, code: int) -> str:
        return self.texts[code - _DYNAMIC] if code >= _DYNAMIC else REASON_TEXT.get(Reason(code), "unknown")

    def totals(self) -> dict:
        """Bytes recovered, zero and lost; each broken down as a list of objects (a key per field,
        never a file name or a sentence as a key): by source and layer, by why, by reason."""
        r = self.runs
        n = r.end - r.start
        rec = (r.status == S_DATA) | (r.status == S_COMPRESSED)
        by_source: dict[tuple[str, int], int] = {}
        for i in np.flatnonzero(rec).tolist():
            key = (self._source(i), int(r.depth[i]))
            by_source[key] = by_source.get(key, 0) + int(n[i])
        lost: dict[str, int] = {}
        for i in np.flatnonzero(r.status == S_LOST).tolist():
            reason = self.reason_text(int(r.reason[i]))
            lost[reason] = lost.get(reason, 0) + int(n[i])
        zero: dict[str, int] = {}
        for i in np.flatnonzero(r.status == S_ZERO).tolist():
            why = ZERO_WHY[int(r.reason[i])]
            zero[why] = zero.get(why, 0) + int(n[i])
        return {"recovered": int(n[rec].sum()), "zero": int(n[r.status == S_ZERO].sum()),
                "lost": int(n[r.status == S_LOST].sum()),
                "recovered-by-source": [{"source": src, "file": self.layers[d], "depth": d, "bytes": b}
                                        for (src, d), b in by_source.items()],
                "zero-by-why": [{"why": w, "bytes": b} for w, b in zero.items()],
                "lost-by-reason": [{"reason": k, "bytes": b} for k, b in sorted(lost.items(), key=lambda kv: -kv[1])],
                "orphaned-data-clusters": self.evidence}

    @property
    def exit_code(self) -> int:
        """0 when every byte is known (and no guest data lies orphaned), 1 otherwise."""
        return 1 if (self.runs.status == S_LOST).any() or self.evidence else 0

    def _source(self, i: int) -> str:
        r = self.runs
        if r.status[i] == S_COMPRESSED:
            return "compressed-cluster"
        return "raw-file" if self._raw[int(r.depth[i])] else "data-cluster"

    def range_json(self, i: int) -> dict:
        r = self.runs
        st, d = int(r.status[i]), int(r.depth[i])
        out: dict = {"start": int(r.start[i]), "length": int(r.end[i] - r.start[i])}
        if st in (S_DATA, S_COMPRESSED):
            out.update({"status": "recovered", "source": self._source(i), "file": self.layers[d], "depth": d})
            if st == S_DATA:
                out["host-offset"] = int(r.host[i])
            else:
                out["host-offset"] = descriptor_fields(int(r.host[i]) & ((1 << 64) - 1), self._cbits[d])[0]
        elif st == S_ZERO:
            out.update({"status": "zero", "why": ZERO_WHY[int(r.reason[i])], "file": self.layers[d], "depth": d,
                        "host-offset": None})
        else:
            out.update({"status": "lost", "reason": self.reason_text(int(r.reason[i])), "file": self.layers[d],
                        "depth": d, "host-offset": None})
        return out

    def to_json(self) -> dict:
        return {"image": self.image, "virtual-size": self.virtual_size,
                "output": {"path": self.output, "format": self.output_format},
                "ranges": [self.range_json(i) for i in range(len(self.runs))], "summary": self.totals(),
                "files": self.files, "orphans": self.orphans, "notes": self.notes}

    _raw: list[bool] = field(default_factory=list)
    _cbits: list[int] = field(default_factory=list)


# ---- the chain, as far as it may be followed -------------------------------------------------------
def _open_chain(path: str, policy: BackingPolicy, texts: list[str], notes: list[str]) -> list[_Layer]:
    top = ImageFile.open(path)
    try:
        layers = [_Layer(path, top, analyse_layer(top))]
    except BaseException:
        top.close()
        raise
    seen = {os.path.realpath(path)}
    try:
        cur = layers[0]
        while isinstance(cur.file, ImageFile):
            h = cur.file.header
            name = h.backing_file
            if not name:
                if h.backing_file_offset and cur.file.reading.strict_error:
                    cur.below_reason = _text(texts, f"the backing file name is unreadable ({cur.file.reading.strict_error})")
                break
            why, nxt = _open_backing(path, cur, name, policy, seen)
            if nxt is None:
                cur.below_reason = _text(texts, why)
                notes.append(f"{cur.path}: {why}")
                break
            layers.append(nxt)
            cur.below = nxt
            cur = nxt
            if len(layers) > 64:
                raise QcowError(f"{path}: backing chain deeper than 64 layers")
    except BaseException:
        for layer in layers:
            layer.file.close()
        raise
    return layers


def _open_backing(top: str, cur: _Layer, name: str, policy: BackingPolicy, seen: set) -> tuple[str, _Layer | None]:
    try:
        bpath = resolve_backing_path(cur.path, name)
    except BackingError as e:
        return f"backing file not followed: {e}", None
    if not os.path.exists(bpath):
        return f"backing file {show_name(bpath)} is missing", None
    try:
        real = policy.check(top, bpath)
    except BackingRefused as e:
        return str(e), None
    if real in seen:
        return f"backing file {show_name(name)} makes a loop in the backing chain", None
    seen.add(real)
    fmt = cur.file.header.backing_format
    try:
        fmt = fmt or probe_format(bpath)
        if fmt == "raw":
            return "", _Layer(bpath, RawFile(bpath), None)
        if fmt != "qcow2":
            return f"backing file {show_name(bpath)} has format {show_name(fmt)} (qcow2 and raw are supported)", None
        f = ImageFile.open(bpath)
    except QcowError as e:
        return f"backing file {show_name(bpath)} unreadable: {e}", None
    try:
        return "", _Layer(bpath, f, analyse_layer(f))
    except QcowError as e:
        f.close()
        return f"backing file {show_name(bpath)} unreadable: {e}", None


def _text(texts: list[str], text: str) -> int:
    if text not in texts:
        texts.append(text)
    return _DYNAMIC + texts.index(text)


def _compose(layers: list[_Layer], d: int, a: int, b: int) -> GuestRuns:
    """Runs of layer d over [a, b) with its unallocated ranges answered by the layers below."""
    layer = layers[d]
    if layer.map is None:  # raw: data up to its end, zeros past it
        end = min(b, layer.file.file_size)
        parts = []
        if a < end:
            parts.append(GuestRuns.make(a, end, S_DATA, a, 0, d))
        if max(a, end) < b:
            parts.append(GuestRuns.make(max(a, end), b, S_ZERO, -1, ZERO_PAST_BACKING, d))
        return GuestRuns.concat(parts)
    runs = layer.map.runs.clip(a, b)
    runs.depth = np.full(len(runs), d, dtype=np.int16)
    fall = np.flatnonzero(runs.status == S_FALL)
    if not len(fall):
        return runs
    parts, prev = [], 0
    below = layer.below
    for i in fall.tolist():
        parts.append(runs.take(slice(prev, i)))
        s, e = int(runs.start[i]), int(runs.end[i])
        if below is None:
            status, why = (S_LOST, layer.below_reason) if layer.below_reason else (S_ZERO, ZERO_UNALLOCATED)
            parts.append(GuestRuns.make(s, e, status, -1, why, d))
        else:
            bsize = below.map.virtual_size if below.map is not None else below.file.size
            if s < min(e, bsize):
                parts.append(_compose(layers, d + 1, s, min(e, bsize)))
            if max(s, bsize) < e:
                parts.append(GuestRuns.make(max(s, bsize), e, S_ZERO, -1, ZERO_PAST_BACKING, d))
        prev = i + 1
    parts.append(runs.take(slice(prev, len(runs))))
    return GuestRuns.concat(parts)


# ---- writing --------------------------------------------------------------------------------------
def _write(layers: list[_Layer], runs: GuestRuns, sink) -> GuestRuns:
    """Write the recovered runs to `sink`; compressed clusters that fail become lost."""
    status = runs.status.copy()
    reason = runs.reason.copy()
    cache: dict[tuple[int, int], bytes | None] = {}
    for i in np.flatnonzero((runs.status == S_DATA) | (runs.status == S_COMPRESSED)).tolist():
        s, e, d = int(runs.start[i]), int(runs.end[i]), int(runs.depth[i])
        f = layers[d].file
        if runs.status[i] == S_DATA:
            host = int(runs.host[i])
            for p in range(s, e, _CHUNK):
                n = min(_CHUNK, e - p)
                sink.write(p, f.pread(host + p - s, n))
            continue
        cs = f.cluster_size
        base = s - s % cs
        key = (d, base)
        if key not in cache:
            word0 = int(runs.host[i]) & ((1 << 64) - 1)
            off, nbytes = descriptor_fields(word0, f.header.cluster_bits)
            try:
                cache[key] = decompress(f.pread(off, nbytes), cs, f.header.compression_type, "")
            except QcowError:
                cache[key] = None
            if len(cache) > 64:
                cache.pop(next(iter(cache)))
        data = cache[key]
        if data is None:
            status[i], reason[i] = S_LOST, Reason.COMPRESSED_BAD
            continue
        sink.write(s, data[s - base:e - base])
    out = GuestRuns(runs.start, runs.end, status, np.where(status == S_LOST, -1, runs.host), reason, runs.depth)
    return out.coalesce()


def _export_orphans(layers: list[_Layer], where: str | None) -> list[dict]:
    out = []
    if where is not None:
        os.makedirs(where, exist_ok=True)
    for d, layer in enumerate(layers):
        if layer.map is None:
            continue
        o = layer.map.orphans
        cs = layer.map.cluster_size
        for c, g, leak in zip(o.clusters.tolist(), o.guesses.tolist(), o.leaked.tolist()):
            rec = {"file": layer.path, "depth": d, "host-offset": c * cs, "guess": GUESS_NAMES[g],
                   "leaked": bool(leak), "saved-as": None}
            if where is not None:
                name = f"{'' if d == 0 else f'depth{d}-'}0x{c * cs:x}-{GUESS_NAMES[g]}.bin"
                with open(os.path.join(where, name), "wb") as fh:
                    fh.write(layer.file.pread(c * cs, cs))
                rec["saved-as"] = name
            out.append(rec)
    if where is not None:
        with open(os.path.join(where, "orphans.json"), "w") as fh:
            json.dump(out, fh, indent=2)
    return out


def salvage(image: str, output: str | None = None, *, out_format: str = "raw", orphans_dir: str | None = None,
            force_share: bool = False, policy: BackingPolicy | None = None) -> Salvage:
    """Analyse `image` (never written) and, with `output`, write the guest disk there."""
    policy = policy or BackingPolicy.from_env(confine=True)
    texts: list[str] = []
    notes: list[str] = []
    layers = _open_chain(image, policy, texts, notes)
    locks: list[ImageLock] = []
    try:
        for depth, layer in enumerate(layers):  # a reader's locks on every file read, as qemu-io -r [-U]
            locks.append(ImageLock(layer.file.fd, layer.path, perms=SHARING if force_share else READER,
                                   where=opening(image, depth)).acquire())
        top = layers[0].map
        assert top is not None
        for layer in layers:
            notes.extend(f"{layer.path}: {n}" for n in (layer.map.notes if layer.map else ()))
        runs = _compose(layers, 0, 0, top.virtual_size).coalesce()
        if output is not None:
            runs = _write_output(layers, runs, output, out_format, top)
        result = Salvage(image, top.virtual_size, runs, [layer.path for layer in layers], texts, notes,
                         _export_orphans(layers, orphans_dir),
                         sum(layer.map.orphans.evidence for layer in layers if layer.map),
                         output, out_format if output else None)
        result._raw = [layer.map is None for layer in layers]
        result._cbits = [layer.file.header.cluster_bits if layer.map else 0 for layer in layers]
        rec = (runs.status == S_DATA) | (runs.status == S_COMPRESSED)
        result.files = [layers[d].path for d in sorted(set(runs.depth[rec].tolist()))]
        return result
    finally:
        release_all(locks)
        for layer in layers:
            layer.file.close()


def _write_output(layers, runs: GuestRuns, output: str, out_format: str, top: LayerMap) -> GuestRuns:
    real = os.path.realpath(output)
    for layer in layers:
        if os.path.realpath(layer.path) == real:
            raise QcowError(f"{output}: is {'the image' if layer is layers[0] else 'its backing file'} being "
                            "salvaged; refusing to write it")
    if os.path.isdir(output):
        raise QcowError(f"{output}: is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".qdebug-salvage",
                               dir=os.path.dirname(os.path.abspath(output)))
    try:
        if out_format == "qcow2":
            h = layers[0].file.header
            sink = Qcow2Sink(fd, top.virtual_size, h.cluster_bits, h.extended_l2, output)
        else:
            sink = RawSink(fd, top.virtual_size, output)
        runs = _write(layers, runs, sink)
        sink.close()
        os.close(fd)
        fd = -1
        os.replace(tmp, output)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    return runs
