"""The package layout is the architecture: imports point one way, local -> controller -> api.

Read from the source (every import, top-level or inside a function), so a new import against the
direction fails here rather than in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "src" / "finetune_operator"
# What each package may not import.
FORBIDDEN = {
    "api": ("finetune_operator.controller", "finetune_operator.local", "finetune_operator.cli"),
    "controller": ("finetune_operator.local", "finetune_operator.cli"),
    "local": ("finetune_operator.cli",),
}


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def violations(package: str) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)} imports {module}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for module in sorted(imported_modules(path))
        if module.startswith(FORBIDDEN[package])
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    assert violations(package) == []


def test_every_module_is_in_a_package_but_the_cli() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py"]


def test_a_wrong_import_would_be_noticed(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from finetune_operator.local.run import run_local\n")
    assert "finetune_operator.local.run" in imported_modules(source)
    assert any(m.startswith(FORBIDDEN["api"]) for m in imported_modules(source))
