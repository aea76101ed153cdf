"""Issue #16's code-shape rules, checked on the source (no imports, < 1 s): no function in
``bids_adhd/`` longer than 80 lines (docstring included), and no ``getattr(args`` outside
``cli.py`` (the library reads settings objects, not an argparse namespace)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bids_adhd"
MAX_LINES = 80


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE).as_posix()}::{node.name}", node.end_lineno - node.lineno + 1


def test_no_function_longer_than_80_lines():
    long = {name: n for name, n in _functions() if n > MAX_LINES}
    assert long == {}


def test_no_argparse_namespace_in_the_library():
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in sorted(PACKAGE.rglob("*.py")) if p.name != "cli.py"
            or p.parent != PACKAGE for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if "getattr(args" in line]
    assert hits == []
