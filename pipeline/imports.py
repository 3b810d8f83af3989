"""Which of this repository's files a script runs: its imports, followed transitively through the
in-repo packages (`code_closure`). The DAG test checks each stage's dvc.yaml deps against it, and
the training checkpoint's code digest hashes the training worker's closure."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model")


def module_file(name: str) -> Path | None:
    """The in-repo file of a dotted module name (a package's __init__.py), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_level(tree: ast.AST):
    """The nodes that run when a module is imported: everything but function bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path, lazy: bool = True) -> set[str]:
    """Dotted names a file imports, with lazy imports in its functions unless `lazy` is False,
    plus string constants that name an in-repo module: the workers run_workers starts
    ("pipeline.train")."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree) if lazy else module_level(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            # `from pkg import module` imports the module; a name that is no module is dropped
            names.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            if module_file(node.value):
                names.add(node.value)
    return names


def code_closure(script: Path) -> set[str]:
    """Repo-relative paths of every in-repo file a stage script runs, transitively, with the
    packages' __init__.py that hold more than a docstring. A module named by an import counts
    with the imports inside its functions (what is imported from it gets called); a parent
    package that `import pkg.mod` runs on the way counts with its module-level imports only."""
    seen: dict[Path, bool] = {}
    todo = [(script, True)]
    while todo:
        path, lazy = todo.pop()
        if seen.get(path) is True or seen.get(path) == lazy:
            continue
        seen[path] = lazy
        for name in imported_modules(path, lazy):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:i]))
                if found:
                    todo.append((found, i == len(parts)))
    return {p.relative_to(ROOT).as_posix() for p in seen if not trivial_init(p)}


def trivial_init(path: Path) -> bool:
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)
