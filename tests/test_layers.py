"""The package layers: core (ldm) → autoencoder → pipelines → entry points (ldm_toolkit). Every module's imports,
read with ast (lazy ones inside functions too), name only its own layer or those below it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ldm", "autoencoder", "pipelines", "ldm_toolkit")  # each may import only the ones before it


def imported_packages(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(root: Path) -> list[str]:
    """``path:line imports X (layer of Y)`` for each import of a layer above the module's own."""
    problems = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((root / layer).rglob("*.py")):
            for line, package in imported_packages(path.read_text()):
                if package in LAYERS and LAYERS.index(package) > rank:
                    problems.append(f"{path.relative_to(root)}:{line} imports {package} (a layer above {layer})")
    return problems


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward_imports(ROOT) == []


def test_an_upward_import_is_named(tmp_path: Path) -> None:
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "ldm" / "ok.py").write_text("import torch\nfrom ldm.config import load_yaml\n")
    (tmp_path / "ldm" / "bad.py").write_text("def f():\n    from pipelines import Models\n")
    (tmp_path / "autoencoder" / "fine.py").write_text("from ldm.io import read_checkpoint\n")
    assert upward_imports(tmp_path) == ["ldm/bad.py:2 imports pipelines (a layer above ldm)"]
