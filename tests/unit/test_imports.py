"""The direction of imports: protocol <- worker, protocol <- boss, never the other way.

A worker VM must never need SQLAlchemy or the Google client, and the
protocol package stays pure. Checked twice: at run time (a fresh interpreter
imports every module and then looks at ``sys.modules``) and statically (every
import statement, including ones inside functions, read with ``ast``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "protocol": frozenset({"boss", "worker", "sqlalchemy", "alembic", "psycopg", "paramiko",
                           "fsspec", "fabric", "googleapiclient"}),
    "worker": frozenset({"boss", "sqlalchemy", "alembic", "psycopg", "googleapiclient"}),
}


def modules(package: str) -> list[str]:
    """Every module of a package, by walking its directory (not importing it)."""
    base = ROOT / package
    found = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append(".".join(parts))
    return found


_PROBE = """
import importlib, json, sys
result = {}
for package, names in json.loads(sys.argv[1]):
    for name in names:
        importlib.import_module(name)
    result[package] = sorted({m.partition(".")[0] for m in sys.modules})
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """Top-level modules loaded after importing protocol, then after adding worker."""
    plan = [[pkg, modules(pkg)] for pkg in ("protocol", "worker")]
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(plan)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, list[str]] = json.loads(proc.stdout)
    return data


def test_probe_sees_the_packages(loaded: dict[str, list[str]]) -> None:
    assert "protocol.document" in modules("protocol")
    assert "worker.attempt" in modules("worker")
    assert "protocol" in loaded["protocol"] and "pydantic" in loaded["protocol"]
    assert "worker" not in loaded["protocol"]
    assert {"worker", "protocol"} <= set(loaded["worker"])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_runtime_imports(package: str, loaded: dict[str, list[str]]) -> None:
    present = set(loaded[package]) & FORBIDDEN[package]
    assert not present, f"importing {package} loads {sorted(present)}"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.partition(".")[0]))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            # importlib.import_module("sqlalchemy") is an import too
            found.append((node.lineno, node.args[0].value.partition(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_static_imports(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports_of(path):
            if module in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not bad, "\n".join(bad)


def test_static_scan_sees_lazy_imports(tmp_path: Path) -> None:
    """The scanner itself: imports inside functions and by importlib are found."""
    f = tmp_path / "m.py"
    f.write_text("import os\n"
                 "from . import sibling\n"
                 "def f():\n"
                 "    from sqlalchemy.orm import Session\n"
                 "    import importlib\n"
                 "    importlib.import_module('boss.db')\n")
    assert sorted(m for _, m in imports_of(f)) == ["boss", "importlib", "os", "sqlalchemy"]
