"""The shape of the package, checked: import layers, the README's module table (docs/architecture.md, Layers)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from helpers import REPO

ROOT = REPO
PACKAGE = ROOT / "pipeline"

# Lowest first. A module may import its own layer's package and any lower layer, never a higher one; the
# packages that share a layer (models and data) do not import each other. Modules at the top of pipeline/
# are entry points: they may import anything.
LAYERS = [
    {"common"},  # files, fault points: imports nothing from pipeline
    {"config"},  # structured configs and overrides
    {"models", "data"},  # networks and losses; corpora, degradation, datasets
    {"engine"},  # the one training engine and the run's bookkeeping
    {"inference"},  # the trained chain, speech recognition, scores, listening pages
    {"stages"},  # one module per training stage
    {"ops"},  # the team's tracking server, a local one, the kill soak
]
ENTRY_POINTS = "entry points"
ENTRY_PACKAGES = {"bench"}  # ``python -m pipeline.bench``: an entry point in a package of its own


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The layer package ``module`` belongs to (``pipeline.engine.trainer`` -> ``engine``), or ENTRY_POINTS."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ENTRY_PACKAGES:
        return ENTRY_POINTS
    if (PACKAGE / parts[1]).is_dir() or parts[1] == "config":
        return parts[1]
    return ENTRY_POINTS


def imports(path: Path) -> set[str]:
    """The pipeline modules ``path`` imports (``from pipeline.x import y`` counts y when it is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pipeline"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*candidate.split("."))
                ).is_dir()
                out.add(candidate if is_module else node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(part: str) -> int:
    if part == ENTRY_POINTS:
        return len(LAYERS)
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"pipeline/{part}/ is in no layer: add it to LAYERS in {Path(__file__).name}")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` that goes up a layer or across to a sibling package."""
    out = []
    for module, targets in graph.items():
        here = part_of(module)
        for target in sorted(targets):
            there = part_of(target)
            if here == ENTRY_POINTS or here == there:
                continue
            if layer_of(there) >= layer_of(here):
                out.append(f"{module} imports {target} ({here} may not import {there})")
    return out


def test_no_lower_layer_imports_a_higher_one():
    graph = import_graph()
    assert len(graph) > 50, "the import graph was not read"
    assert violations(graph) == []


@pytest.mark.parametrize(
    "module, target",
    [
        ("pipeline.data.datasets", "pipeline.engine.trainer"),  # data does not import the engine
        ("pipeline.engine.trainer", "pipeline.stages.train_adapter"),
        ("pipeline.models.hifigan", "pipeline.data.corpus"),  # siblings
        ("pipeline.common.files", "pipeline.config"),
        ("pipeline.inference.chain", "pipeline.stages.vocoder_base"),
        ("pipeline.engine.session", "pipeline.main"),  # a library never imports an entry point
    ],
)
def test_the_layer_check_fails_on_an_import_that_goes_up(module, target):
    graph = import_graph()
    graph[module] = graph[module] | {target}
    assert violations(graph) == [f"{module} imports {target} ({part_of(module)} may not import {part_of(target)})"]


def what_is_here() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## What is here", 1)[1].split("\n## ", 1)[0]


def named_in(section: str, path: Path) -> bool:
    """Whether the README section names ``path``: its full path, or its file name on a row naming its folder."""
    rel = path.relative_to(ROOT).as_posix()
    if f"`{rel}`" in section or f"{rel}" in re.findall(r"`([^`]+)`", section):
        return True
    folder = path.parent.relative_to(ROOT).as_posix() + "/"
    rows = [row for row in section.splitlines() if f"`{folder}" in row]
    return any(f"`{path.name}`" in row for row in rows)


def test_the_readme_names_every_module():
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"]
    section = what_is_here()
    missing = [p.relative_to(ROOT).as_posix() for p in modules if not named_in(section, p)]
    assert missing == [], f"README.md's 'What is here' does not name: {missing}"
    stale = [path for path in re.findall(r"`(pipeline/[\w/]+\.py)`", section) if not (ROOT / path).exists()]
    assert stale == [], f"README.md's 'What is here' names modules that do not exist: {stale}"
