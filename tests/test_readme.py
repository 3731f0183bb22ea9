"""The README's shell sessions run as shown: when qdebug's output drifts from the README, this fails.

A fenced block right after `<!-- readme-test: NAME -->` is a session. Its `$ ` lines run in bash, in
one scratch directory per NAME (blocks of one name continue each other, in README order), with the
qdebug of this checkout first on PATH. The lines after a command are its expected stdout and stderr,
merged as a terminal shows them (blank lines before the next `$ ` are layout); a line `...` stands for any number of lines, `...` inside a line
for any text. `$ echo $?` shows the previous command's exit status; every other command must exit 0.
A command ending in `<<EOF` takes the block's lines up to `EOF` as its here-document.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .qemu import require_qemu

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```[a-z]*\n(.*?)```", re.S)


@dataclass(frozen=True)
class Command:
    line: int  # README line of the `$ `
    shell: str
    expected: tuple[str, ...]


def sessions(text: str) -> dict[str, list[Command]]:
    out: dict[str, list[Command]] = {}
    for m in BLOCK.finditer(text):
        first = text.count("\n", 0, m.start(2)) + 1
        cmds = out.setdefault(m.group(1), [])
        lines = m.group(2).splitlines()
        i = 0
        assert lines and lines[0].startswith("$ "), f"README.md:{first}: a tested block starts with `$ `"
        while i < len(lines):
            line_no, shell = first + i, lines[i][2:]
            i += 1
            if re.search(r"<<'?EOF'?$", shell):
                end = lines.index("EOF", i)
                shell = "\n".join([shell, *lines[i:end], "EOF"])
                i = end + 1
            expected = []
            while i < len(lines) and not lines[i].startswith("$ "):
                expected.append(lines[i])
                i += 1
            while expected and not expected[-1].strip():  # a blank line between commands is layout
                expected.pop()
            cmds.append(Command(line_no, shell, tuple(expected)))
    return out


def _pattern(expected: tuple[str, ...]) -> re.Pattern[str]:
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*".join(re.escape(p) for p in line.rstrip().split("...")) + r"[ \t]*\n")
    return re.compile("".join(parts))


def matches(expected: tuple[str, ...], output: str) -> bool:
    text = "".join(line.rstrip() + "\n" for line in output.splitlines())
    return _pattern(expected).fullmatch(text) is not None


README_TEXT = README.read_text()
SESSIONS = sessions(README_TEXT)


def test_the_readme_has_tested_sessions():
    assert {"inspect", "write", "hazard", "check"} <= set(SESSIONS)


def test_the_matcher_fails_on_drift():
    assert matches(("a", "...", "d ... f"), "a\nb\nc\nd e f\n")
    assert not matches(("a", "d"), "a\nb\nd\n")
    assert not matches(("x ... 0x3000",), "x guest 0x300000\n")


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_readme_session(name, tmp_path):
    require_qemu()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               LANG="C", LC_ALL="C", TERM="dumb", NO_COLOR="1", COLUMNS="100")
    status = 0
    for cmd in SESSIONS[name]:
        if cmd.shell.strip() == "echo $?":
            output, ok = f"{status}\n", True
        else:
            p = subprocess.run(["bash", "-c", cmd.shell], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
            output, status = p.stdout.decode(), p.returncode
            next_cmd = SESSIONS[name][SESSIONS[name].index(cmd) + 1:][:1]
            ok = status == 0 or (next_cmd and next_cmd[0].shell.strip() == "echo $?")
        assert ok, f"README.md:{cmd.line}: `{cmd.shell}` exited {status}:\n{output}"
        assert matches(cmd.expected, output), (
            f"README.md:{cmd.line}: `{cmd.shell}` printed:\n{output}\nthe README shows:\n" + "\n".join(cmd.expected))
