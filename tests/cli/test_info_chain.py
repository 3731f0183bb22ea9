"""`qdebug info` on backing chains against `qemu-img info` 7.2: a missing backing file is not an
error (qemu-img info opens the image without its backing file), `--backing-chain` prints every
image (human: blocks separated by a blank line; JSON: an array), and a missing link there is exit 1
with nothing on stdout. qdebug's own section / key is removed before comparing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.qemu import QEMU_IMG, create, qemu_img, qemu_io

ENV = {**os.environ, "TZ": "UTC"}


def run_both(cwd, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    q = subprocess.run([QEMU_IMG, "info", *args], capture_output=True, text=True, cwd=cwd, env=ENV)
    d = subprocess.run([sys.executable, "-m", "qdebug.cli", "info", *args], capture_output=True, text=True, cwd=cwd,
                       env={**ENV, "PYTHONPATH": os.getcwd()})
    return q, d


def qemu_part(text: str) -> str:
    """qdebug's human info with each image's `qdebug:` section cut off."""
    return "\n\n".join(block.split("qdebug:\n")[0].rstrip("\n") for block in text.split("\n\n")) + "\n"


def without_qdebug(doc):
    if isinstance(doc, list):
        return [without_qdebug(d) for d in doc]
    assert list(doc)[-1] == "qdebug" or doc["format"] == "raw"
    doc.pop("qdebug", None)
    return doc


def same(q, d, json_output: bool) -> None:
    assert d.returncode == q.returncode == 0, d.stderr
    if json_output:
        assert json.dumps(without_qdebug(json.loads(d.stdout)), indent=4) + "\n" == q.stdout
    else:
        assert qemu_part(d.stdout) == q.stdout


@pytest.fixture
def chain(tmp_path):
    """top.qcow2 -> sub/mid.qcow2 -> sub/base.raw (relative names, one resolved against sub/)."""
    (tmp_path / "sub").mkdir()
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "sub" / "base.raw"), "1000")
    create(str(tmp_path / "sub" / "mid.qcow2"), "4M", backing="base.raw", backing_fmt="raw")
    create(str(tmp_path / "top.qcow2"), "4M", cluster_size="32k", extended_l2=False, backing="sub/mid.qcow2")
    qemu_io(str(tmp_path / "top.qcow2"), "write -P 7 0 100k")
    qemu_img("snapshot", "-c", "s1", str(tmp_path / "sub" / "mid.qcow2"))
    return tmp_path


@pytest.mark.parametrize("output", ["human", "json"])
def test_backing_chain_is_qemu_imgs(chain, qemu, output):
    for name in ("top.qcow2", str(chain / "top.qcow2"), "sub/mid.qcow2"):
        for extra in ((), ("-U",)):
            q, d = run_both(chain, "--backing-chain", f"--output={output}", *extra, name)
            same(q, d, output == "json")
    q, d = run_both(chain, "--backing-chain", f"--output={output}", "sub/base.raw", "-f", "raw")
    assert q.returncode == 0  # (qdebug reads qcow2 images: a raw one on the command line is refused)
    assert d.returncode == 1 and "not supported" in d.stderr


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("missing", ["sub/mid.qcow2", "sub/base.raw"])
def test_missing_backing_file(chain, qemu, output, missing):
    os.rename(chain / missing, chain / "moved")
    # plain info: the image alone, exit 0, as qemu-img (a warning on stderr says the chain is broken)
    for name in ("top.qcow2", "sub/mid.qcow2"):
        if os.path.exists(chain / name):
            q, d = run_both(chain, f"--output={output}", name)
            same(q, d, output == "json")
            if name == "top.qcow2" and missing == "sub/mid.qcow2" or name == "sub/mid.qcow2":
                assert "not found" in d.stderr
    # --backing-chain: a link it cannot open is exit 1, and nothing is printed
    q, d = run_both(chain, "--backing-chain", f"--output={output}", "top.qcow2")
    assert q.returncode == d.returncode == 1
    assert q.stdout == d.stdout == ""
    assert missing in d.stderr and "not found" in d.stderr
