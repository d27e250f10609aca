"""The README is executable documentation: its Python blocks run as written, every ``smartcrop`` command line in
it parses with the real CLI, and its install line says how to get the CPU-only torch build."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(lang: str | set) -> list[str]:
    langs = {lang} if isinstance(lang, str) else lang
    return [code for kind, code in _BLOCK.findall(README.read_text(encoding="utf-8")) if kind in langs]


def command_lines() -> list[list[str]]:
    """Arguments after ``smartcrop`` of every command line in the README's shell blocks (continuations joined,
    comments, pipes and redirections cut)."""
    out = []
    for code in blocks({"sh", "console", "bash", "shell"}):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, comments=True)
                if not words or words[0] != "smartcrop":
                    continue
                args = []
                for w in words[1:]:
                    if w in {"<", ">"} or w.startswith(("<", ">")):
                        break
                    args.append(w)
                out.append(args)
    return out


def test_readme_has_code():
    assert blocks("python") and command_lines()


def test_every_smartcrop_command_line_in_the_readme_parses():
    import click
    import typer

    from smartcrop.cli import app

    root = typer.main.get_command(app)
    for args in command_lines():
        cmd, rest, name = root, list(args), "smartcrop"
        while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
            name += " " + rest[0]
            cmd = cmd.commands[rest.pop(0)]
        assert not isinstance(cmd, click.Group) or rest[:1] in (["--help"], ["--version"]), args
        if not isinstance(cmd, click.Group):
            with cmd.make_context(name, rest):  # raises click.UsageError on an unknown option or a bad value
                pass


def test_install_line_says_how_to_get_the_cpu_only_torch():
    text = README.read_text(encoding="utf-8")
    assert "download.pytorch.org/whl/cpu" in text  # a plain `pip install torch` on Linux is the CUDA build


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from conftest import draw_photo

    monkeypatch.chdir(tmp_path)
    draw_photo(tmp_path / "photo.jpg", size=(1024, 683))  # the photo the examples name
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for code in blocks("python"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
            assert out.getvalue().strip(), "the example prints its results"
    finally:
        torch.set_num_threads(n)


def _declared_packages() -> set:
    """The distribution names pyproject.toml declares: dependencies and every extra's."""
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", s).group(0).lower().replace("_", "-") for s in specs}


def test_install_hints_name_packages_the_project_declares_never_pypis_smartcrop():
    """The project named smartcrop on PyPI is another tool (smartcrop.py): a hint to `pip install
    'smartcrop[faces]'` installs it.  Every `pip install NAME` in smartcrop's own messages and help, the README
    and the scale-out guide names a package pyproject.toml declares (or this folder, '.')."""
    root = README.parent
    sources = [*sorted((root / "smartcrop").glob("*.py")), README, root / "docs" / "scale-out.md"]
    named = {}
    for path in sources:
        for m in re.finditer(r"pip install\s+(?:-\S+\s+)*['\"]?([^\s'\"`)]+)", path.read_text(encoding="utf-8")):
            named.setdefault(re.match(r"[^\\\[<>=!~ ]*", m.group(1)).group(0), []).append(path.name)
    assert named, "no install hint found: the pattern is wrong"
    declared = _declared_packages()
    bad = {name: where for name, where in named.items()
           if name not in (".", "SMARTCROP_FOLDER") and name.lower().replace("_", "-") not in declared}
    assert not bad, bad
    assert "smartcrop" not in {n.lower() for n in named}
