"""The exit-code table (cli/conventions.py COMMON_EXITS / COMMAND_EXITS), run: each row a command
line that must exit with it, qemu-img's status alongside where qemu-img has the command; and every
command's `--help` lists its codes."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess

import pytest

from qdebug.cli import main
from qdebug.cli.conventions import COMMAND_EXITS, COMMON_EXITS
from qdebug.cli.main import build_parser
from tests.engine.corruptions import corrupt
from tests.qemu import create, require_qemu


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    require_qemu()
    d = tmp_path_factory.mktemp("exits")
    clean = str(d / "clean.qcow2")
    create(clean, "4M")
    paths = {"clean": clean, "raw": str(d / "raw.img"), "dir": str(d), "missing": str(d / "nope.qcow2")}
    with open(paths["raw"], "wb") as f:
        f.write(b"not an image" * 100)
    for name in ("refcount_down", "leak_free_cluster"):
        paths[name] = str(d / f"{name}.qcow2")
        shutil.copy(clean, paths[name])
        subprocess.run(["qemu-io", "-c", "write -P 1 0 128k", paths[name]], check=True, capture_output=True)
        corrupt(paths[name], name)
    return paths


# (argv with {placeholders}, qdebug's status, the qemu-img command line with the same meaning or None)
TABLE = [
    (["info", "{clean}"], 0, ["info", "{clean}"]),
    (["info", "--bogus", "{clean}"], 1, ["info", "--bogus", "{clean}"]),  # usage: 1, not argparse's 2
    (["info", "--output=xml", "{clean}"], 1, ["info", "--output=xml", "{clean}"]),
    (["check", "--bogus", "{clean}"], 1, ["check", "--bogus", "{clean}"]),
    (["check", "{clean}"], 0, ["check", "{clean}"]),
    (["check", "{refcount_down}"], 2, ["check", "{refcount_down}"]),
    (["check", "{leak_free_cluster}"], 3, ["check", "{leak_free_cluster}"]),
    (["check", "{raw}"], 63, ["check", "{raw}"]),
    (["check", "{missing}"], 1, ["check", "{missing}"]),
    (["map", "{missing}"], 1, ["map", "{missing}"]),
    (["info", "{dir}"], 1, ["info", "{dir}"]),
    (["info", "-f", "vmdk", "{clean}"], 1, ["info", "-f", "vmdk", "{clean}"]),
    (["info", "-f", "qcow2", "{raw}"], 1, ["info", "-f", "qcow2", "{raw}"]),
    (["info", "--image-opts", "{clean}"], 1, None),
    (["info", "json:{{}}"], 1, None),
    (["repair", "--dry-run", "{clean}"], 0, None),
    (["repair", "--dry-run", "{refcount_down}"], 2, None),
    (["repair", "--dry-run", "{leak_free_cluster}"], 3, None),
    (["salvage", "{clean}"], 0, None),
    (["salvage", "--bogus", "{clean}"], 2, None),  # salvage's 1 means "something lost"
    (["salvage", "{missing}"], 2, None),
    (["scan", "{clean}", "{leak_free_cluster}"], 3, None),
    (["scan", "{clean}", "{refcount_down}"], 2, None),
    ([], 1, []),  # nothing to do: qemu-img says "Not enough arguments", 1
    (["{missing}"], 1, None),  # `qdebug IMAGE`: the file's own error
    (["{dir}"], 1, None),
    (["info", "--help"], 0, ["info", "--help"]),
]


@pytest.mark.parametrize("argv,status,qemu", TABLE, ids=[" ".join(a) or "(none)" for a, _, _ in TABLE])
def test_exit_code_table(files, argv, status, qemu):
    rc, _out, err = run(*[a.format(**files) for a in argv])
    assert rc == status, err
    if rc not in (0, 2, 3):
        lines = [ln for ln in err.splitlines() if ln.startswith("qdebug: error: ")]
        assert len(lines) == 1 and "internal error" not in err, err
    if qemu is not None:
        q = subprocess.run(["qemu-img", *[a.format(**files) for a in qemu]], capture_output=True)
        assert q.returncode == status, q.stderr


def test_errors_name_the_file(files):
    rc, _, err = run("info", files["raw"])
    assert rc == 1 and f"{files['raw']}: not a qcow2 image (bad magic at offset 0)" in err
    rc, _, err = run(files["missing"])
    assert err.strip() == f"qdebug: error: {files['missing']}: No such file or directory"
    rc, _, err = run(files["dir"])
    assert err.strip() == f"qdebug: error: {files['dir']}: Is a directory"


def test_internal_error_is_70_and_one_line(files, monkeypatch):
    import qdebug.cli.inspect as inspect

    def boom(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(inspect, "cmd_info", boom)
    monkeypatch.delenv("QDEBUG_DEBUG", raising=False)
    rc, _, err = run("info", files["clean"])
    assert rc == 70 and err.count("\n") == 1 and err.startswith("qdebug: internal error: ZeroDivisionError")


def test_every_command_documents_its_exit_codes():
    sub = build_parser()._subparsers._group_actions[0].choices
    for name, sp in sub.items():
        text = sp.format_help()
        assert "exit codes:" in text, name
        rows = dict(COMMON_EXITS)
        rows.update(COMMAND_EXITS.get(name, ()))
        for code in rows:
            assert f"\n  {code:<4} " in text, (name, code)
