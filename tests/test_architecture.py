"""The dependency rule of docs/architecture.md, checked on the source of every module.

import-linter would be the maintained tool, but it finds a package's modules by walking the
package's folder, and ``hdrq_plugin.export`` is installed from the top-level ``export/`` folder
(the design card), so it cannot see the exporter. This reads the same facts with ``ast``: every
``import`` / ``from ... import`` (also inside functions), relative ones resolved.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Lowest first. A module may import its own layer and the layers below it, never above.
LAYERS = (
    ("shared", ("errors", "families", "architectures", "bitspec", "data", "_io", "evaluation", "_legacy_paths",
                "options", "progress")),
    ("quant", ("quant",)),
    ("convert", ("convert",)),
    ("ptq", ("ptq",)),
    ("merge", ("merge",)),
    ("hot", ("hot",)),
    ("nipq", ("nipq",)),
    ("verb", ("quantize",)),
    ("export", ("export",)),
    ("run", ("run",)),
    ("cli", ("cli", "cli_commands")),
)
#: Same-rank packages that must not import each other.
INDEPENDENT = {("merge", "hot"), ("hot", "nipq"), ("ptq", "hot")}
#: Only the faces may use the examples package (the CLI's ``demo`` and ``domain:NAME`` data).
MAY_IMPORT_EXAMPLES = {"cli"}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "hdrq_examples":
        return "examples"
    if parts[0] != "hdrq_plugin" or len(parts) == 1:
        return None  # the package's own __init__ is the public face over every layer
    for name, members in LAYERS:
        if parts[1] in members:
            return name
    raise AssertionError(f"{module} belongs to no layer of docs/architecture.md: add it there and here")


def _rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)


def source_modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "hdrq_plugin").rglob("*.py")):
        found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    for path in sorted((ROOT / "export").rglob("*.py")):
        found["hdrq_plugin." + ".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return {name.removesuffix(".__init__"): path for name, path in found.items()}


def imported_modules(module: str, source: str, is_package: bool) -> set[str]:
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
    return names


def violations(modules: dict[str, str]) -> list[str]:
    """``modules``: module name → source. Returns one line per import that breaks the rule."""
    found = []
    for module, (source, is_package) in modules.items():
        layer = _layer_of(module)
        if layer is None:
            continue
        for target in sorted(imported_modules(module, source, is_package)):
            target_layer = _layer_of(target)
            if target_layer is None or target_layer == layer:
                continue
            if target_layer == "examples":
                if layer not in MAY_IMPORT_EXAMPLES:
                    found.append(f"{module} imports {target}: only {sorted(MAY_IMPORT_EXAMPLES)} may use examples")
            elif (layer, target_layer) in INDEPENDENT or (target_layer, layer) in INDEPENDENT:
                found.append(f"{module} ({layer}) imports {target} ({target_layer}): independent packages")
            elif _rank(target_layer) > _rank(layer):
                found.append(f"{module} ({layer}) imports {target} ({target_layer}), a layer above it")
    return found


def _read_all() -> dict[str, tuple[str, bool]]:
    return {name: (path.read_text(), path.name == "__init__.py") for name, path in source_modules().items()}


def test_no_module_imports_a_layer_above_its_own():
    assert violations(_read_all()) == []


def test_every_module_belongs_to_a_layer():
    for name in source_modules():
        _layer_of(name)


@pytest.mark.parametrize("module, source, broken", [
    ("hdrq_plugin.quant.noise", "from ..merge.rules import ROUNDING_RULES", "a layer above"),
    ("hdrq_plugin.export.formats.qdq", "def f():\n    from hdrq_plugin.run.checkpoint import load_quantized", "a layer above"),
    ("hdrq_plugin.merge.models", "import hdrq_plugin.hot.mode", "independent"),
    ("hdrq_plugin.ptq.engine", "from hdrq_examples.domains import load_domain", "may use examples"),
    ("hdrq_plugin.errors", "from .families import get_family\nfrom .cli import main", "a layer above"),
])
def test_the_check_catches_a_deliberately_broken_import(module, source, broken):
    modules = _read_all()
    modules[module] = (source, False)
    assert any(broken in line and module in line for line in violations(modules))
