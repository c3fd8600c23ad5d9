"""The version of a module's code: a hash of the source of every in-repository module it imports, transitively.

Imports are read from the source (ast), including those inside functions, so a stage's fingerprint covers exactly
the code that can run in it, with no list kept by hand.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "schemas", "data")  # what the work layer may import from this repository
# config values are fingerprinted per section; this module's source only declares and validates them
NOT_CODE = frozenset({"stages.config"})


def module_file(name: str) -> Path | None:
    """The source file of an in-repository module or package, None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(name: str, path: Path) -> set[str]:
    """Module names that `path` (the module `name`) imports, with each module's parent packages."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}


def module_closure(modules: Iterable[str]) -> dict[str, Path]:
    """Every in-repository module the given modules import, transitively (themselves included), by name."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_CODE:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imported(name, path))
    return dict(sorted(seen.items()))


@cache
def code_version(modules: tuple[str, ...]) -> str:
    """Hash of the source of the given modules and everything they import from this repository."""
    digest = hashlib.sha256()
    for path in module_closure(modules).values():
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
