"""Code shape: lines per module and the functions longer than a limit (STYLE.md: size as a smell, not a law).

    python scripts/code_shape.py                  # modules over 500 lines, functions over 60, totals
    python scripts/code_shape.py --all --json     # every module and long function, machine-readable

A function's length is its `def` line to its last line (docstring, comments and blank lines included),
so a nested function counts inside its parent and on its own. tests/test_code_shape.py holds the ceiling:
no function over LIMIT lines beyond its allow-list, and none on the list grown past its recorded length.
Standard library only (ast), so it runs anywhere.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ldm_deploy", "training", "scripts")
LIMIT = 60          # lines per function (STYLE.md: "functions past ~60 usually hide two ideas")
MODULE_LIMIT = 500  # lines per module (STYLE.md: "modules past ~500 lines")


def python_files(root: Path = ROOT, packages=PACKAGES) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def module_lines(root: Path = ROOT, packages=PACKAGES) -> dict[str, int]:
    """{"ldm_deploy/cli.py": 212, ...}: physical lines per module."""
    return {p.relative_to(root).as_posix(): len(p.read_text().splitlines()) for p in python_files(root, packages)}


def function_lengths(source: str) -> dict[str, int]:
    """{"Class.method": lines, "function.inner": lines, ...} for every function in `source`."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out[name] = max(out.get(name, 0), child.end_lineno - child.lineno + 1)   # a redefinition keeps the longest
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def long_functions(root: Path = ROOT, packages=PACKAGES, limit: int = LIMIT) -> dict[str, int]:
    """{"ldm_deploy/runtime/pipeline.py::Pipeline.__call__": 103, ...}: functions over `limit` lines, longest first."""
    found = {}
    for path in python_files(root, packages):
        rel = path.relative_to(root).as_posix()
        for name, n in function_lengths(path.read_text()).items():
            if n > limit:
                found[f"{rel}::{name}"] = n
    return dict(sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=LIMIT, help=f"function length to report (default {LIMIT})")
    ap.add_argument("--all", action="store_true", help="list every module, not only those over 500 lines")
    ap.add_argument("--json", action="store_true", help="print JSON: {modules, long_functions, totals}")
    args = ap.parse_args(argv)
    modules = module_lines()
    longs = long_functions(limit=args.limit)
    totals = {"modules": len(modules), "lines": sum(modules.values()),
              f"functions_over_{args.limit}": len(longs)}
    if args.json:
        print(json.dumps({"modules": modules, "long_functions": longs, "totals": totals}, indent=2))
        return 0
    shown = modules if args.all else {k: v for k, v in modules.items() if v > MODULE_LIMIT}
    print(f"modules{'' if args.all else f' over {MODULE_LIMIT} lines'}:")
    for name, n in sorted(shown.items(), key=lambda kv: -kv[1]):
        print(f"  {n:5d}  {name}")
    print(f"functions over {args.limit} lines:")
    for name, n in longs.items():
        print(f"  {n:5d}  {name}")
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
