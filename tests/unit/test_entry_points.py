"""Every MLproject entry point accepts each of its parameters alone (and none), as MLflow users type them.

The cases are generated from the MLproject file, so a new entry point or parameter is covered by itself. Each
command is made by MLflow's own code (``EntryPoint.compute_command``, what ``mlflow run`` runs: a parameter left
out becomes ``''``), split into words by bash, and given to the entry point's ``parse_args``. It may refuse the
input (the message names what is missing), but never with a grammar error (``GrammarError``: "Expected key=value
arguments", "Malformed override"). One case also goes through a real ``mlflow run``.
"""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import FAKE_RUN_ID, REPO
from mlflow.exceptions import ExecutionException
from mlflow.projects._project_spec import load_project

from pipeline.config import ConfigError, GrammarError, compose_config
from pipeline.engine.launch import parse_launch
from pipeline.stages import stage_class

PROJECT = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
# What a user would type for a parameter of this name; "overrides" and "options" take one word of the entry's own.
EXAMPLES = {
    "run_id": FAKE_RUN_ID,
    "resume_run": FAKE_RUN_ID,
    "adapter_run": FAKE_RUN_ID,
    "vocoder_run": FAKE_RUN_ID,
    "asr_run": FAKE_RUN_ID,
    "model_uri": "models:/speech-restoration@champion",
    "resume_step": "100",
    "checkpoint": "latest",
    "input": "my recordings/Ann's take 1.wav",
    "output": "Ann's restored audio",
    "noisy_dir": "field recordings",
    "overwrite": "true",
    "device": "cpu",
    "chunk_seconds": "10",
    "nproc": "2",
    "torchrun": "--max-restarts=1",
    "adapter": "ckpt/adapter.pt",
    "vocoder": "ckpt/vocoder.pt",
    "stage": "train_asr",
    "n_trials": "3",
    "storage": "sqlite:///optuna.db",
    "study": "lr search",
    "ray_address": "auto",
    "options": "workers=1 scores=false",
}
OVERRIDES = {
    "main": "main.reuse=false",
    "evaluate": "test_size=2 seed=7",
    "prepare_data": "data.val_size=2",
    "import_checkpoint": "seed=3",
}


def cases():
    for entry, spec in PROJECT.items():
        yield pytest.param(entry, {}, id=f"{entry}-none")
        for name in spec.get("parameters", {}):
            value = OVERRIDES.get(entry, "seed=3") if name == "overrides" else EXAMPLES[name]
            yield pytest.param(entry, {name: value}, id=f"{entry}-{name}")


def words(entry: str, params: dict[str, str], tmp_path: Path) -> list[str]:
    """The command ``mlflow run -e <entry> -P ...`` runs, split by bash: ``-m <module> <word> ...``."""
    command = load_project(str(REPO)).get_entry_point(entry).compute_command(params, str(tmp_path))
    assert command.startswith("python "), command
    printed = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + command.removeprefix("python ")], capture_output=True, text=True, check=True
    ).stdout
    return printed.split("\0")[:-1]


def parse(module: str, argv: list[str]) -> None:
    """The entry point's own parsing and checking of its words, without a tracking store."""
    if module != "pipeline.launcher":
        importlib.import_module(module).parse_args(argv)
        return
    from pipeline import launcher, sweep

    stage, _, _, args = launcher.parse(argv)
    if stage == "sweep":
        sweep.parse_args(args)
        return
    launch = parse_launch(args, stage_class(stage).run_inputs)
    compose_config(stage, launch.overrides)


@pytest.mark.parametrize("entry, params", cases())
def test_each_parameter_alone_is_read_as_given_never_as_a_grammar_error(entry, params, tmp_path):
    required = [name for name, spec in PROJECT[entry].get("parameters", {}).items() if "default" not in spec]
    if missing := [name for name in required if name not in params]:  # MLflow itself refuses, naming them
        with pytest.raises(
            ExecutionException,
            match="No value given for missing parameters: " + ", ".join(f"'{name}'" for name in missing),
        ):
            words(entry, params, tmp_path)
        return
    argv = words(entry, params, tmp_path)
    assert argv[0] == "-m"
    try:
        parse(argv[1], argv[2:])
    except GrammarError as err:
        pytest.fail(f"mlflow run -e {entry} {' '.join(f'-P {k}={v}' for k, v in params.items())}: {err}")
    except ConfigError as err:  # the input is refused, by name: e.g. "Give exactly one of run_id=... or model_uri"
        assert not params or any(name in str(err) for name in (*PROJECT[entry].get("parameters", {}), "key")), err
