"""The docs cannot drift from the code: every test, module and file they name exists."""

import ast
import re
from functools import cache
from pathlib import Path

import pytest
from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
PATH_REF = re.compile(r"`((?:pipeline|scripts|configs|docs|tests)/[\w./-]*)`")


@cache
def functions_in(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    return frozenset(node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def every_test_name() -> frozenset[str]:
    return frozenset().union(*(functions_in(p) for p in (REPO / "tests").rglob("test_*.py")))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_test_a_doc_names_exists_where_it_says(doc):
    missing = []
    for path, name in TEST_REF.findall(doc.read_text()):
        if not (REPO / path).is_file() or name not in functions_in(REPO / path):
            missing.append(f"{path}::{name}")
    assert not missing, f"{doc.name} names tests that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_test_a_doc_names_without_its_file_exists(doc):
    text = TEST_REF.sub("", doc.read_text())
    # a bare `test_...` of four words or more is a test's name (`test_size` is a setting)
    named = {n for n in re.findall(r"`(test_\w+)`", text) + re.findall(r"::(test_\w+)", text) if n.count("_") >= 3}
    missing = sorted(named - every_test_name())
    assert not missing, f"{doc.name} names tests that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    missing = [
        ref
        for ref in PATH_REF.findall(doc.read_text())
        if "<" not in ref and "*" not in ref and not (REPO / ref.split("::")[0]).exists()
    ]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def readme_table() -> list[tuple[str, str]]:
    """The README's table of the repository's parts: (path, what) per row."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| path | what |") :].split("\n\n")[0]
    return [
        (cells[1].strip(), cells[2].strip())
        for cells in (row.split("|") for row in table.splitlines()[2:])
        if len(cells) >= 3
    ]


def test_every_module_the_readme_table_names_exists():
    rows, missing = readme_table(), []
    assert len(rows) > 10
    for paths, what in rows:
        for path in re.findall(r"`([^`]+)`", paths):
            if not (REPO / path).exists():
                missing.append(path)
        folder = re.findall(r"`([^`]+/)`", paths)
        for name in re.findall(r"`([\w/.-]+\.(?:py|md|sh|yaml|sbatch))`", what):
            if folder and not any((REPO / f / name).exists() for f in folder):
                missing.append(f"{folder[0]}{name}")
    assert not missing, f"README.md's table names what does not exist: {missing}"
