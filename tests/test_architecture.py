"""The package's layers (docs/architecture.md): import-linter's contracts in pyproject.toml hold, and latentgen's
own imports sit at the top of each module, where the contracts see them, except in the commands (which import
lazily so that --help and mistakes answer without loading torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LAZY = {"latentgen/__init__.py", "latentgen/serve.py", "latentgen/convert.py", "latentgen/merge.py",
        "latentgen/training/command.py", "latentgen/data/__main__.py"}


def test_import_linter_contracts_hold():
    linter = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(linter)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in r.stdout


def test_the_package_imports_itself_only_at_module_level():
    found = []
    for path in sorted((ROOT / "latentgen").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name in LAZY:
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in tree.body:  # `if TYPE_CHECKING:` blocks are module level too
            if isinstance(node, ast.If):
                top |= {id(child) for child in node.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top and (node.module or "").startswith("latentgen"):
                found.append(f"{name}:{node.lineno} from {node.module}")
            if isinstance(node, ast.ImportFrom) and node.level:
                found.append(f"{name}:{node.lineno} relative import")
    assert not found, found
