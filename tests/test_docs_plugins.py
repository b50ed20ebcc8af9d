"""docs/plugins.md is tested: every code block runs, and its reference names every protocol
member and every factory keyword of minfm_core.protocols.

Blocks after a paragraph naming a file (`minfm_beta/__init__.py`, `pyproject.toml`, `my.toml`)
are written to that file in a fresh folder, "installed" as a distribution (a dist-info built
from the pyproject's entry points, as pip would make), and then every console command is run
and its output compared; Python blocks holding tests run under pytest, the others are executed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minfm_core import protocols
from minfm_core.recipe.toml import tomllib
from minfm_core.registry import KINDS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, the file the paragraph before it names) for each fenced block."""
    text = DOC.read_text()
    out = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip().rsplit("\n\n", 1)[-1]
        named = re.findall(r"\(`([\w/.-]+\.(?:py|toml))`", before)
        out.append((m.group(1), m.group(2), named[-1] if named else None))
    return out


def install(folder: Path, pyproject: Path) -> None:
    """What ``pip install -e .`` leaves behind for importlib.metadata: a dist-info folder."""
    project = tomllib.loads(pyproject.read_text())["project"]
    info = folder / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = project["entry-points"]["minfm"]
    (info / "entry_points.txt").write_text("[minfm]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))


def test_every_block_has_a_known_language():
    assert {lang for lang, _, _ in blocks()} <= {"python", "toml", "console"}


def test_every_code_block_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    consoles, snippets, tests = [], [], []
    for i, (lang, code, named) in enumerate(blocks()):
        if named:
            (tmp_path / named).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / named).write_text(code)
            if named == "pyproject.toml":
                install(tmp_path, tmp_path / named)
        elif lang == "console":
            consoles.append(code)
        elif lang == "python" and "def test_" in code:
            (tmp_path / f"test_doc_block_{i}.py").write_text(code)
        elif lang == "python":
            snippets.append(code)
        else:
            raise AssertionError(f"a {lang} block that names no file:\n{code}")
    tests = sorted(p.name for p in tmp_path.glob("test_*.py"))
    assert tests and consoles and snippets

    for code in snippets:
        exec(compile(code, str(DOC), "exec"), {})  # noqa: S102  (the docs' own snippets)

    for code in consoles:
        commands = re.split(r"^\$ ", code, flags=re.MULTILINE)[1:]
        for command in commands:
            line, *expected = command.rstrip("\n").split("\n")
            if line.startswith("pip install"):
                continue  # done by install() above
            r = subprocess.run(line.replace("minfm ", f"{sys.executable} -m minfm_core.cli.main ", 1), shell=True,
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
            assert [x.rstrip() for x in r.stdout.splitlines()] == expected, (line, r.stdout, r.stderr)

    def minfm(*args):
        return subprocess.run([sys.executable, "-m", "minfm_core.cli.main", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    r = minfm("check", "my.toml")
    assert r.returncode == 0, r.stderr
    # "`a = "three"` gives `flow.time_sampler.a: ...`": each promised error, as the docs word it
    promised = re.findall(r"`(\w+) = ([^`]+)` gives\s+`([^`]+)`", DOC.read_text())
    assert len(promised) == 2
    for key, value, message in promised:
        r = minfm("check", "my.toml", "--set", f"flow.time_sampler.{key}={value}")
        assert r.returncode == 2 and message in r.stderr, (key, value, r.stderr)

    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"{len(tests) + 1} passed" in r.stdout  # the kit block holds two tests


def section(kind: str) -> str:
    text = DOC.read_text()
    start = text.index(f"### `{KINDS[kind]}`")
    end = text.find("\n### ", start + 1)
    return " ".join(text[start:end].split())  # line breaks are layout


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_names_every_member_and_keyword(kind):
    text = section(kind)
    assert f"protocol `{protocols.PROTOCOLS[kind].__name__}`" in text
    for member, required in protocols.members(kind).items():
        assert f"`{member}" in text, f"{kind}: member {member} is not documented"
        if not required:
            assert "Optional" in text, f"{kind}: {member} has a default, the section says nothing is optional"
    for keyword, default in protocols.FACTORY_KWARGS[kind].items():
        shown = f"*, {keyword}" if default is protocols._REQUIRED else f"{keyword}={default!r}".replace("'", '"')
        assert shown in text, f"{kind}: factory keyword {shown} is not documented"


def test_reference_documents_every_hook():
    from minfm_core import hookspecs

    specs = {n for n, f in vars(hookspecs).items() if n.startswith(("register_", "check_")) and callable(f)}
    assert set(KINDS.values()) <= specs
    assert set(re.findall(r"^### `(\w+)`", DOC.read_text(), flags=re.MULTILINE)) >= specs


def test_every_packing_helper_is_documented():
    import inspect

    from minfm_core import packing

    helpers = [n for n, f in vars(packing).items()
               if inspect.isfunction(f) and f.__module__ == packing.__name__ and not n.startswith("_")]
    text = DOC.read_text()
    missing = [n for n in helpers if f"`{n}(" not in text]
    assert helpers and not missing, f"packing helpers missing from docs/plugins.md: {missing}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_lists_every_builtin_component(kind):
    from minfm_core.registry import get_registry

    builtin = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["minfm"])
    reg = get_registry()
    names = {n for n in reg.names(kind) if reg.get(kind, n).plugin in builtin}
    m = re.search(r"Built-ins?: ((?:`\w+`(?:, | and |, and )?)+)", section(kind))
    assert m, f"{kind}: the section has no 'Built-ins: ...' list"
    assert set(re.findall(r"`(\w+)`", m.group(1))) == names
