"""`qdebug create -o ...` against `qemu-img create -f qcow2 -o ...` 7.2, option by option and in
combinations: the same "Formatting ..." line, the same file byte for byte, the same allocated
extents (preallocation), and the same refusals with qemu-img's messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.qemu import QEMU_IMG, create, qemu_io


def extents(path: str) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA / SEEK_HOLE): what preallocation allocates."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def run_both(tmp_path, qemu_args: list[str], qdebug_args: list[str] | None = None):
    """The same `create` through both tools, each in its own directory with the same file names."""
    results = []
    for tool in ("qemu", "qdebug"):
        d = tmp_path / tool
        d.mkdir()
        for name in os.listdir(tmp_path / "shared") if (tmp_path / "shared").exists() else []:
            os.link(tmp_path / "shared" / name, d / name)
        if tool == "qemu":
            cmd = [QEMU_IMG, "create", "-f", "qcow2", *qemu_args]
        else:
            cmd = [sys.executable, "-m", "qdebug.cli", "create", *(qdebug_args or qemu_args)]
        p = subprocess.run(cmd, capture_output=True, cwd=d, env={**os.environ, "PYTHONPATH": os.getcwd()})
        results.append((d, p))
    return results


def with_ext(opts: str) -> str:
    """qdebug's default is extended_l2=on; qemu-img is told so."""
    return opts if opts.startswith(",") or "extended_l2" in opts or "compat=0.10" in opts or "compat=v2" in opts else \
        ("extended_l2=on," + opts if opts else "extended_l2=on")


CASES = [
    ("", "3M"), ("preallocation=off", "3M"),
    ("preallocation=metadata", "3M"), ("preallocation=metadata", "3M+512"), ("preallocation=metadata", "1000"),
    ("preallocation=metadata", "0"), ("preallocation=metadata,extended_l2=off", "3M+512"),
    ("preallocation=metadata,cluster_size=512,extended_l2=off", "8M"),
    ("preallocation=metadata,cluster_size=16k,refcount_bits=1", "40M"),
    ("preallocation=metadata,cluster_size=2M", "1G"),
    ("preallocation=falloc", "3M"), ("preallocation=falloc", "3M+512"), ("preallocation=falloc", "0"),
    ("preallocation=falloc,extended_l2=off,cluster_size=512", "4M"),
    ("preallocation=falloc,cluster_size=16k,refcount_bits=64", "20M"),
    ("preallocation=full", "3M"), ("preallocation=full,extended_l2=off", "5M+1024"),
    ("preallocation=full,cluster_size=4k,extended_l2=off,refcount_bits=2", "6M"),
    ("lazy_refcounts=on", "1G"), ("lazy_refcounts=yes,preallocation=metadata", "5M"),
    ("lazy_refcounts,extended_l2=y", "1M"), ("nolazy_refcounts", "1M"),
    ("compat=0.10", "1G"), ("compat=v2,cluster_size=4k", "64M"), ("compat=0.10,preallocation=metadata", "3M"),
    ("compat=1.1", "1M"), ("compat=v3,lazy_refcounts=true", "1M"),
    ("refcount_bits=1", "1G"), ("refcount_bits=010", "1G"), ("refcount_bits=0x40", "1G"),
    ("compression_type=zstd", "1G"), ("compression_type=zlib,cluster_size=0x8000", "1G"),
    ("cluster_size=512,extended_l2=off", "1G"), ("cluster_size=2M,extended_l2=off", "100G"),
    ("cluster_size=1.5k,cluster_size=64k", "1G"),
    ("nocow=on", "1M"), ("extent_size_hint=0", "1M"), ("extent_size_hint=1M,nocow=off", "1M"),
    ("encryption=off,data_file_raw=off", "1M"),
    ("size=5M", None), ("size=0", None), ("size=1.5G,cluster_size=128k", None),
]


@pytest.mark.parametrize("opts,size", CASES)
def test_create_option_sets_make_qemu_imgs_file(tmp_path, qemu, opts, size):
    if size and "+" in size:
        base, extra = size.split("+")
        size = str(int(base[:-1]) * (1 << 20) + int(extra))
    tail = [size] if size else []
    qemu_args = (["-o", with_ext(opts)] if with_ext(opts) else []) + ["img.qcow2", *tail]
    qdebug_args = (["-o", opts] if opts else []) + ["img.qcow2", *tail]
    (q_dir, q), (m_dir, m) = run_both(tmp_path, qemu_args, qdebug_args)
    assert q.returncode == 0, q.stderr
    assert m.returncode == 0, m.stderr
    assert m.stdout == q.stdout  # the Formatting line
    mine, ref = m_dir / "img.qcow2", q_dir / "img.qcow2"
    assert mine.read_bytes() == ref.read_bytes()
    assert extents(str(mine)) == extents(str(ref))


def test_backing_file_spellings_and_preallocation_with_a_backing_file(tmp_path, qemu):
    shared = tmp_path / "shared"
    shared.mkdir()
    base = create(str(shared / "b,x.qcow2"), "3M")
    qemu_io(base, "write -P 0x11 0 1M")
    for i, (qemu_opts, qdebug_args) in enumerate([
        ("extended_l2=on,backing_file=b,,x.qcow2,backing_fmt=qcow2", ["-o", "backing_file=b,,x.qcow2,backing_fmt=qcow2"]),
        ("extended_l2=on,preallocation=metadata", ["-b", "b,x.qcow2", "-F", "qcow2", "-o", "preallocation=metadata"]),
        ("extended_l2=on,preallocation=falloc", ["-b", "b,x.qcow2", "-F", "qcow2", "-o", "preallocation=falloc"]),
        ("extended_l2=on,preallocation=full,lazy_refcounts=on", ["-b", "b,x.qcow2", "-F", "qcow2", "-o",
                                                                "preallocation=full,lazy_refcounts=on"]),
    ]):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        (sub / "shared").mkdir()
        os.link(base, sub / "shared" / "b,x.qcow2")
        qemu_args = ["-o", qemu_opts] + ([] if "backing_file" in qemu_opts else ["-b", "b,x.qcow2", "-F", "qcow2"])
        (q_dir, q), (m_dir, m) = run_both(sub, qemu_args + ["img.qcow2"], qdebug_args + ["img.qcow2"])
        assert q.returncode == 0 and m.returncode == 0, (q.stderr, m.stderr)
        assert m.stdout == q.stdout
        assert (m_dir / "img.qcow2").read_bytes() == (q_dir / "img.qcow2").read_bytes()
        assert extents(str(m_dir / "img.qcow2")) == extents(str(q_dir / "img.qcow2"))


@pytest.mark.parametrize("opts,size,message", [
    ("cluster_size=3k", "1M", "Cluster size must be a power of two between 512 and 2048k"),
    ("cluster_size=4M", "1M", "Cluster size must be a power of two between 512 and 2048k"),
    ("cluster_size=1k", "1M", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ("extended_l2=on,compat=0.10", "1M", "Extended L2 entries are only supported with compatibility level 1.1"),
    ("compat=0.10,lazy_refcounts=on", "1M", "Lazy refcounts only supported with compatibility level 1.1"),
    ("compat=0.10,refcount_bits=8", "1M", "Different refcount widths than 16 bits require compatibility level"),
    ("compat=0.10,compression_type=zstd", "1M", "Non-zlib compression type is only supported with compatibility"),
    ("refcount_bits=3", "1M", "Refcount width must be a power of two and may not exceed 64 bits"),
    ("refcount_bits=128", "1M", "Refcount width must be a power of two and may not exceed 64 bits"),
    ("preallocation=bogus", "1M", "Parameter 'preallocation' does not accept value 'bogus'"),
    ("compat=1.0", "1M", "Parameter 'version' does not accept value '1.0'"),
    ("compression_type=lz4", "1M", "Parameter 'compression-type' does not accept value 'lz4'"),
    ("backing_fmt=qcow2", "1M", "Backing format cannot be used without backing file"),
    ("bogus=1", "1M", "Invalid parameter 'bogus'"),
    ("lazy_refcounts=maybe", "1M", "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
    ("refcount_bits=abc", "1M", "Parameter 'refcount_bits' expects a number"),
    ("cluster_size=abc", "1M", "Parameter 'cluster_size' expects a non-negative number below 2^64"),
    (",cluster_size=4k", "1M", "Invalid option list: ,cluster_size=4k"),
    ("size=1M", "1M", "The image size must be specified only once"),
    ("", None, "Image creation needs a size parameter"),
])
def test_create_refuses_what_qemu_img_refuses(tmp_path, qemu, opts, size, message):
    tail = [size] if size else []
    (q_dir, q), (m_dir, m) = run_both(tmp_path, (["-o", with_ext(opts)] if opts else []) + ["img.qcow2", *tail],
                                      (["-o", opts] if opts else []) + ["img.qcow2", *tail])
    assert q.returncode == 1 and message in q.stderr.decode()
    assert m.returncode == 1 and message in m.stderr.decode(), m.stderr
    err = m.stderr.decode()
    assert err.startswith("qdebug: error:") and err.count("\n") == 1
    assert m.stdout == q.stdout  # the Formatting line, or none, as qemu-img prints before failing


@pytest.mark.parametrize("opts,word", [
    ("encryption=on", "encryption"), ("encrypt.format=luks", "encryption"),
    ("data_file=d.raw", "data_file"), ("data_file_raw=on", "data_file"),
])
def test_encryption_and_data_files_are_refused_clearly(tmp_path, opts, word):
    p = subprocess.run([sys.executable, "-m", "qdebug.cli", "create", "-o", opts, str(tmp_path / "x.qcow2"), "1M"],
                       capture_output=True)
    assert p.returncode == 1
    assert p.stderr.decode().startswith(f"qdebug: error: {word}: qdebug does not create")
    assert not (tmp_path / "x.qcow2").exists()


def test_create_options_help_lists_every_option():
    from qdebug.cli.create_options import OPTIONS, options_help

    text = options_help()
    assert all(f"  {name}=" in text for name, *_ in OPTIONS)
