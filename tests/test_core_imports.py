"""The module import graph of minFM's packages has no circle, and the core reaches no
plugin, neither by an import statement nor at run time through importlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"minfm_core": "minfm_core", "minfm_plugins": "plugins", "minfm_hub": "hub", "minfm_apps": "apps"}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in FOLDERS.items():
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = py
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines |= set(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere (function bodies too, not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_import_graph_is_acyclic():
    modules = _modules()
    # A package's __init__ that re-exports its submodules is not a circle with them: the
    # edge from a submodule to its own package is the import system's, not a design choice.
    graph = {n: {t for t in _edges(n, p, modules) if not n.startswith(t + ".")} for n, p in modules.items()}
    assert _cycles(graph) == []


def test_core_reaches_no_plugin_at_import_time():
    """Every core module imported (no plugin loading asked for): no plugin module is loaded."""
    names = sorted(n for n in _modules() if n.startswith("minfm_core"))
    code = ("import importlib, sys\n"
            f"for n in {names!r}:\n    importlib.import_module(n)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('minfm_plugins', 'minfm_hub', 'minfm_apps'))\n"
            "print(bad)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_the_cycle_finder_finds_cycles():
    modules = _modules()
    assert "minfm_plugins.knapformer.exchange" in _edges(
        "minfm_plugins.knapformer.ulysses", modules["minfm_plugins.knapformer.ulysses"], modules)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_hub_plugin_talks_to_the_hub():
    """One route to the Hub: every other package resolves Hub references through the
    ``hf`` source (minfm_core.pretrained, minfm_core.sources), never huggingface_hub itself."""
    offenders = []
    for name, path in _modules().items():
        if name.startswith("minfm_hub"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            else:
                continue
            if any(m == "huggingface_hub" or m.startswith("huggingface_hub.") for m in mods):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders
