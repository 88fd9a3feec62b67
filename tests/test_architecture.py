"""The shape of the package, checked: no import cycle, no reach into another module's
private names, no function longer than 100 lines (docstring aside).

These are the rules of the restructure (one home per concern); a test keeps them true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gradguard"
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, ast.AST, list[str]]]:
    """(imported module, node, imported names) for every import outside TYPE_CHECKING,
    at any depth (a function-level import is still a dependency)."""
    out: list[tuple[str, ast.AST, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("gradguard"):
                        out.append((alias.name, child, []))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child)
                if target.startswith("gradguard"):
                    names = [a.name for a in child.names]
                    submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
                    out.extend((s, child, []) for s in submodules)
                    rest = [n for n in names if f"{target}.{n}" not in MODULES]
                    out.append((target, child, rest))
            visit(child)

    visit(TREES[module])
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in _imports(module):
            # importing a.b.c runs a/__init__ and a/b/__init__ too, but those are the
            # packages' re-exports; the dependency that matters is the module itself
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_no_import_cycle() -> None:
    graph = _graph()
    # a package's __init__ re-exports its modules: edges from a package's own modules to
    # that package's __init__ would be the only legitimate "cycle"; there must be none
    assert _cycles(graph) == []


def test_no_module_uses_another_modules_private_names() -> None:
    offences = []
    for module, tree in TREES.items():
        aliases: dict[str, str] = {}  # local name -> gradguard module
        for target, node, names in _imports(module):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == target:
                        aliases[alias.asname or alias.name.split(".")[0]] = target
            else:
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in MODULES:
                        aliases[alias.asname or alias.name] = full
                for n in names:
                    if n.startswith("_") and not n.startswith("__") and target != module:
                        offences.append(f"{module}: from {target} import {n}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                offences.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")
    assert offences == []


def test_no_writes_to_another_objects_private_attributes() -> None:
    offences = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if (isinstance(sub, ast.Attribute) and sub.attr.startswith("_")
                            and not sub.attr.startswith("__")
                            and not (isinstance(sub.value, ast.Name)
                                     and sub.value.id in ("self", "cls"))):
                        offences.append(f"{module}:{sub.lineno}: {ast.unparse(sub)} = ...")
    assert offences == []


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        if len(body) == 1:
            return 0
        first = body[1]
    start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
    return node.end_lineno - start + 1


def test_no_function_longer_than_100_lines() -> None:
    long = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert long == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_parses_and_is_documented(module: str) -> None:
    tree = TREES[module]
    assert ast.get_docstring(tree), f"{module} has no module docstring"
