"""The package's layers (docs/ARCHITECTURE.md): a module imports only from its own layer or the layers below.

    0 models (and the two small foundations compat.py, config_fields.py)
    1 schedules.py, schedulers/, losses/
    2 methods/
    3 data/, training/, pipelines/, inference/, evaluation/
    4 the package's __init__.py

Imports are read from the source with ``ast`` (relative and absolute ``ppdiffusers_fast`` imports, also inside
functions), so a lazy import cannot hide an upward dependency.
"""
import ast
from pathlib import Path
from typing import List

PACKAGE = Path(__file__).resolve().parents[1] / "ppdiffusers_fast"

LAYERS = {
    "compat": 0, "config_fields": 0, "command_line": 0, "models": 0,
    "schedules": 1, "schedulers": 1, "losses": 1,
    "methods": 2,
    "data": 3, "training": 3, "pipelines": 3, "inference": 3, "evaluation": 3,
    "__init__": 4,
}


def _imported_parts(node: ast.AST, package_parts: List[str]) -> List[List[str]]:
    """Module paths (inside the package, as parts) an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "ppdiffusers_fast"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        parts = (node.module or "").split(".")
        return [parts[1:]] if parts[0] == "ppdiffusers_fast" else []
    base = package_parts[:len(package_parts) - (node.level - 1)]
    if node.module:
        return [base + node.module.split(".")]
    return [base + [alias.name] for alias in node.names]


def upward_imports(package: Path) -> List[str]:
    """``"file: a (layer i) imports b (layer j)"`` for every import of a higher layer; unknown top-level names too."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        own = parts[0]
        if own not in LAYERS:
            problems.append(f"{path}: top-level module {own!r} has no layer (add it to LAYERS and ARCHITECTURE.md)")
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported_parts(node, parts[:-1]):
                other = target[0] if target else "__init__"
                if LAYERS.get(other, -1) > LAYERS[own]:
                    problems.append(f"{path.relative_to(package)}: {own} (layer {LAYERS[own]}) imports "
                                    f"{'.'.join(target)} (layer {LAYERS[other]})")
    return problems


def test_no_module_imports_a_higher_layer():
    assert upward_imports(PACKAGE) == []


def test_an_upward_import_is_found(tmp_path):
    package = tmp_path / "ppdiffusers_fast"
    (package / "losses").mkdir(parents=True)
    (package / "losses" / "__init__.py").write_text("")
    (package / "losses" / "bad.py").write_text("def f():\n    from ..methods.pcm import PCM\n    return PCM\n")
    (package / "schedules.py").write_text("import ppdiffusers_fast.training.trainer\n")
    (package / "widgets").mkdir()
    (package / "widgets" / "__init__.py").write_text("")
    problems = upward_imports(package)
    assert any("losses (layer 1) imports methods.pcm (layer 2)" in p for p in problems)
    assert any("schedules (layer 1) imports training.trainer (layer 3)" in p for p in problems)
    assert any("'widgets' has no layer" in p for p in problems)
