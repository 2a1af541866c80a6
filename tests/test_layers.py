"""The package's stages depend one way: cli -> meta -> training -> data / nb201 -> root.

Every import in every module (function-level ones too, since the CLI imports lazily) is
read with ``ast`` and checked against that order. docs/architecture.md draws it.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metad2a_cli"

# What each stage may import besides itself. The root helpers are errors, atomic, paths
# and _version; the package's __init__ (the public API) and __main__ sit above everything.
ALLOWED = {
    "root": set(),
    "data": {"root"},
    "nb201": {"root"},
    "training": {"data", "nb201", "root"},
    "meta": {"training", "data", "nb201", "root"},
    "cli": {"meta", "training", "data", "nb201", "root"},
}
TOP = {"metad2a_cli", "metad2a_cli.__main__"}


def module_name(path: Path) -> str:
    parts = ["metad2a_cli", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in ALLOWED:
        return parts[1]
    if len(parts) == 2 and parts[1] in ALLOWED:  # a stage's own __init__
        return parts[1]
    return "root"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for each import of this package in the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("metad2a_cli"):
                continue
            if node.module is None or target in {"metad2a_cli"} | {f"metad2a_cli.{s}" for s in ALLOWED}:
                # `from . import x`: x may be a submodule, which is what is really imported
                found.extend((node.lineno, f"{target}.{a.name}") for a in node.names)
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("metad2a_cli"))
    return found


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations() -> list[str]:
    bad = []
    for path in all_modules():
        me = module_name(path)
        if me in TOP:
            continue
        mine = stage_of(me)
        for line, target in imported_modules(path):
            theirs = stage_of(target)
            if target == "metad2a_cli" or target.startswith("metad2a_cli.__init__"):
                bad.append(f"{me}:{line} imports the package's public API")
            elif theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{me}:{line} ({mine}) imports {target} ({theirs})")
    return bad


def test_every_module_belongs_to_a_known_stage():
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert stages - {"_weights"} <= set(ALLOWED), "a new subpackage needs a place in ALLOWED"


def test_stages_depend_one_way():
    assert violations() == []


def test_each_stage_says_what_it_owns_and_may_import():
    for stage in ALLOWED:
        if stage == "root":
            continue
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and "import" in doc, stage


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from ..meta.db import Database\n", "metad2a_cli.training.fit:1 (training) imports metad2a_cli.meta.db (meta)"),
        ("from ..cli import common\n", "metad2a_cli.training.fit:1 (training) imports metad2a_cli.cli.common (cli)"),
        ("def f():\n    from ..meta import train\n", "metad2a_cli.training.fit:2 (training) imports metad2a_cli.meta.train (meta)"),
        ("from metad2a_cli.meta.search import X\n", "metad2a_cli.training.fit:1 (training) imports metad2a_cli.meta.search (meta)"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    fake = tmp_path / "metad2a_cli"
    (fake / "training").mkdir(parents=True)
    (fake / "training" / "fit.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == [expected]


def import_graph() -> dict[str, set[str]]:
    known = {module_name(p) for p in all_modules()}
    graph = {}
    for path in all_modules():
        me = module_name(path)
        graph[me] = {t for _, t in imported_modules(path) if t in known and t != me and me not in TOP}
    return graph


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
