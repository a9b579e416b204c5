"""The package's import graph follows the data path: no module imports a later stage, and no import loops.

Order (a module may import its own stage or an earlier one):
  openmp, errors, files → profile → ops → model → placement → engine → report → server → commands → cli
ops sits before model and placement because the model is built from operators and placement's checks read
the operators' declarations; model before placement because the plan is made over the model's meta structure.
"""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ktcli")
ORDER = [("__init__", "openmp", "errors", "files"), ("profile",), ("ops",), ("model",), ("placement",), ("engine",),
         ("report",), ("server",), ("commands",), ("cli", "__main__")]
RANK = {name: i for i, names in enumerate(ORDER) for name in names}


def modules() -> dict:
    """{'ktcli.engine.sweep': path} for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def imports(name: str, path: str, known) -> set:
    """Every ktcli module `name` imports, at any depth of its code (function-level imports count too)."""
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:   # `from .x import name` names a module or something inside one
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("ktcli"):
                found.add(t)
    return found


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {n: imports(n, p, set(modules())) for n, p in modules().items()}


def test_every_stage_is_ranked():
    assert {stage(m) for m in GRAPH} <= set(RANK), "a new top-level module or folder needs a place in ORDER"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_later_stage(module):
    later = [t for t in GRAPH[module] if RANK[stage(t)] > RANK[stage(module)]]
    assert not later, f"{module} ({stage(module)}) reaches up to {later}"


def test_no_import_loops():
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(GRAPH[m]):
            if t.startswith(m + "."):   # a package importing its own submodules in __init__ is not a loop
                continue
            if state.get(t) == "open":
                raise AssertionError("import loop: " + " → ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path):
    """A module of a lower stage importing a higher one, and a loop, are both found (the test can fail)."""
    (tmp_path / "a.py").write_text("from ktcli.report.bench import md\nfrom . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    known = {"ktcli.ops.a", "ktcli.ops.b", "ktcli.report.bench"}
    got_a = imports("ktcli.ops.a", str(tmp_path / "a.py"), known)
    got_b = imports("ktcli.ops.b", str(tmp_path / "b.py"), known)
    assert got_a == {"ktcli.report.bench", "ktcli.ops.b"} and got_b == {"ktcli.ops.a"}
    assert RANK[stage("ktcli.report.bench")] > RANK[stage("ktcli.ops.a")]
