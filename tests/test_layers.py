"""The README's layering rule, checked: a module imports from its own layer or the layers below it, never above,
whether at the top of the file, inside a function, or for type hints only."""

from __future__ import annotations

import ast

from conftest import REPO

LAYERS = [
    ("core", ["gan_dist.config", "gan_dist.configio", "gan_dist.seeds", "gan_dist.cli",
              "gan_dist.signals"]),
    ("environment", ["gan_dist.dist", "gan_dist.amp", "gan_dist.checkpoint"]),
    ("data", ["gan_dist.data"]),
    ("models", ["gan_dist.models"]),
    ("evaluation", ["gan_dist.evaluation"]),
    ("training", ["gan_dist.training"]),
    ("entry points", ["gan_dist", "gan_dist.train", "gan_dist.sample", "gan_dist.evaluate", "gan_dist.curve",
                      "gan_dist.export"]),
]
"""Lowest first. A package stands for every module in it; ``gan_dist`` alone is the package's own face
(``gan_dist.load_generator``), above everything it re-exports."""


def layer_of(module: str) -> int:
    """The layer of a module: the most specific prefix listed."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".") and p != "gan_dist"), default=None)
    if best is not None:
        return best[1]
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted((REPO / "gan_dist").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text())
    return found


def imported(tree: ast.Module, module: str) -> set[str]:
    """Every gan_dist module ``tree`` imports, at any depth (``from gan_dist import cli`` names gan_dist.cli;
    ``from gan_dist import load_generator`` names the package itself)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("gan_dist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gan_dist"):
            if node.module != "gan_dist":
                names.add(node.module)
                continue
            for a in node.names:
                submodule = REPO / "gan_dist" / a.name
                names.add(f"gan_dist.{a.name}" if submodule.with_suffix(".py").is_file() or submodule.is_dir()
                          else "gan_dist")
    return names - {module}


def upward(found: dict[str, ast.Module]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
            for m, tree in found.items() for dep in sorted(imported(tree, m)) if layer_of(dep) > layer_of(m)]


def test_every_module_has_a_layer_and_imports_no_higher_one():
    found = modules()
    assert len(found) > 30
    assert upward(found) == []


def test_the_check_sees_an_upward_import():
    found = modules()
    late = ast.parse("def f():\n    from gan_dist.training.engine import GANEngine\n")
    found["gan_dist.data.cache"].body.append(late)
    assert upward(found) == ["gan_dist.data.cache (data) imports gan_dist.training.engine (training)"]
