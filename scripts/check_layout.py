#!/usr/bin/env python3
"""Check the package layout rules; exit 1 and list what breaks them.

- Layers, bottom up: `kvrag` (errors, atomic I/O) -> `kvrag.encoders`, `kvrag.kernels` ->
  `kvrag.index`, `kvrag.rag` -> `kvrag.service`. No module imports a layer above its own, at module
  level or inside a function.
- No import cycles between modules (imports anywhere in a module count).
- Only `kvrag/service/settings.py` reads the environment or the settings; library code takes
  dataclasses.
- No module over 700 lines.
- Every import names the `kvrag` package (never the bare folders, which are not installed), and none
  names `training` (run from a checkout, not part of the package).
- pyproject.toml lists every package folder.

`KNOWN` holds the breaks that exist today, each to be removed as the code is reworked; a break not in
it fails, and so does an entry of it that no longer breaks (the list only shrinks).

    python scripts/check_layout.py [--json]
"""

from __future__ import annotations

import ast
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kvrag": "kvrag", "encoders": "kvrag.encoders", "kernels": "kvrag.kernels"}
FOLDERS |= {"index": "kvrag.index", "rag": "kvrag.rag", "service": "kvrag.service"}
LAYER = {"kvrag": 0, "kvrag.encoders": 1, "kvrag.kernels": 1, "kvrag.index": 2, "kvrag.rag": 2}
LAYER["kvrag.service"] = 3
MAX_LINES = 700
SETTINGS_MODULE = "kvrag.service.settings"

# Breaks that exist today: (rule, subject). Each goes as the code is reworked.
KNOWN: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """Module name -> file, for every Python file of the package folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def package_of(module: str) -> str:
    """The layer package a module belongs to (`kvrag.rag.pipeline` -> `kvrag.rag`)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in LAYER else "kvrag"


def imports(module: str, path: Path, known: dict[str, Path]) -> tuple[set[str], list[str]]:
    """(kvrag modules imported anywhere in the file, bare top-level folder imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    bare: list[str] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if (top in FOLDERS and top != "kvrag") or top == "training":
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name}")
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found, bare


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check() -> list[tuple[str, str, str]]:
    """Every break: (rule, subject, detail)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    breaks: list[tuple[str, str, str]] = []
    # a package's __init__ is imported with any of its modules: it is not an edge of its own
    for module, path in known.items():
        deps, bare = imports(module, path, known)
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
        breaks += [("bare-import", module, b) for b in bare]
        for dep in graph[module]:
            if LAYER[package_of(dep)] > LAYER[package_of(module)]:
                breaks.append(("upward-import", f"{module} -> {dep}", "a lower layer imports a higher one"))
        if dep_on_settings(module, path, deps):
            breaks.append(("reads-settings", module, "library code reads the environment or the settings"))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            breaks.append(("too-long", module, f"{lines} lines (at most {MAX_LINES})"))
    for comp in cycles(graph):
        breaks.append(("import-cycle", " <-> ".join(comp), "modules import each other"))
    breaks += check_pyproject(known)
    return breaks


def dep_on_settings(module: str, path: Path, deps: set[str]) -> bool:
    if module.startswith("kvrag.service"):
        return False
    text = path.read_text(encoding="utf-8")
    return SETTINGS_MODULE in deps or "os.environ" in text or "os.getenv" in text or "get_settings(" in text


def check_pyproject(known: dict[str, Path]) -> list[tuple[str, str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {m for m, p in known.items() if p.name == "__init__.py"}
    return [
        ("pyproject-packages", p, "package folder not listed in pyproject") for p in sorted(packages - listed)
    ] + [("pyproject-packages", p, "listed in pyproject, no such folder") for p in sorted(listed - packages)]


def main(argv: list[str]) -> int:
    breaks = check()
    new = [b for b in breaks if (b[0], b[1]) not in KNOWN]
    fixed = sorted(KNOWN - {(b[0], b[1]) for b in breaks})
    if "--json" in argv:
        print(json.dumps({"breaks": breaks, "new": new, "fixed_but_listed": fixed}, indent=1))
    else:
        for rule, subject, detail in new:
            print(f"{rule}: {subject}: {detail}")
        for rule, subject in fixed:
            print(f"fixed, remove from KNOWN: {rule}: {subject}")
        print(
            f"{len(breaks)} known breaks, {len(new)} new, {len(fixed)} fixed but still listed",
            file=sys.stderr,
        )
    return 1 if new or fixed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
