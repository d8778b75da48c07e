"""The project's own files agree with each other (set-up, MLproject, conda.yaml, README, CI)."""

import re
import tomllib
from pathlib import Path

import yaml
from helpers import REPO


def test_conda_yaml_pins_match_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip_deps if not d.startswith("-e")) == sorted(deps)
    assert "python=3.11" in conda["dependencies"]


def test_torch_and_torchaudio_are_pinned_together_everywhere():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.11.0" in deps and "torchaudio==2.11.0" in deps
    lock = (REPO / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.11\.0$", lock, re.M) and re.search(r"^torchaudio==2\.11\.0$", lock, re.M)


def test_every_dependency_is_locked():
    lock = {
        line.split("==")[0].lower() for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["test"]
    for dep in names:
        name = re.split(r"[=<>\[]", dep)[0].lower()
        assert name in lock, name


def test_mlproject_entry_points_have_the_documented_parameters():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    train = spec["entry_points"]["train_adapter"]
    assert set(train["parameters"]) == {"overrides", "resume_run", "resume_step", "nproc", "torchrun"}
    assert train["parameters"]["nproc"]["default"] == "1"  # one process unless asked: today's plain job
    assert train["command"].startswith(
        "python -m pipeline.launcher --nproc={nproc} --torchrun={torchrun} train_adapter "
    )


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    # the line under "# 2." in the README's first code block
    command = readme.split("# 2.")[1].splitlines()[1].strip()
    assert command.startswith("bash scripts/setup.sh && bash scripts/lint.sh && .venv/bin/python -m pytest")
    assert command in ci


def test_the_lint_gate_fails_on_a_bad_line(tmp_path):
    """scripts/lint.sh's two commands, with the project's rules, on a file with an unused import and a line
    formatted by hand: both fail and name the finding (the gate's rules are pyproject.toml's [tool.ruff])."""
    import subprocess
    import sys

    ruff = Path(sys.executable).parent / "ruff"
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = {'a':1}\n")
    config = ["--config", str(REPO / "pyproject.toml")]
    lint = subprocess.run([ruff, "check", *config, str(bad)], capture_output=True, text=True)
    assert lint.returncode == 1 and "F401" in lint.stdout, lint.stdout + lint.stderr
    style = subprocess.run([ruff, "format", "--check", *config, str(bad)], capture_output=True, text=True)
    assert style.returncode == 1 and "would be reformatted" in style.stdout + style.stderr, style.stdout + style.stderr
    bad.write_text('x = {"a": 1}\n')
    assert subprocess.run([ruff, "check", *config, str(bad)], capture_output=True).returncode == 0
    assert subprocess.run([ruff, "format", "--check", *config, str(bad)], capture_output=True).returncode == 0
    assert "scripts/lint.sh" in (REPO / ".ci" / "run").read_text()
