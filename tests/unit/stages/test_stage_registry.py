"""The stage registry: a training stage is its module and its YAML (docs/architecture.md, "Adding a stage").

Files a new training stage needs, before and after issue #25 item 5, shown by ``test_a_throwaway_stage_...``:

- before (7): ``pipeline/stages/<stage>.py``, ``configs/<stage>.yaml``, ``pipeline/config.py`` (its schema in
  ``_register()``), ``pipeline/stages/__init__.py`` (``TRAINING_STAGES``), ``pipeline/engine/launch.py``
  (``ALL_RUN_INPUTS``, for a stage that builds on another run), ``MLproject`` and a ``python -m`` shim;
- after (3): ``pipeline/stages/<stage>.py`` (config dataclass, ``@stage_config``, the Stage class with its
  ``run_inputs``), ``configs/<stage>.yaml`` and its ``MLproject`` entry point, which
  ``test_every_registered_stage_has_its_config_and_entry_point`` asks for.
"""

import importlib
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

import pipeline.stages
from pipeline.config import CONFIG_DIR, compose_config, stage_schema
from pipeline.config import compose as composition
from pipeline.engine.launch import parse_launch
from pipeline.stages import stage_class, training_stages

LAUNCH_PARAMETERS = {"overrides", "resume_run", "resume_step", "nproc", "torchrun"}

TOY_MODULE = '''"""toy_stage: a throwaway stage (tests/test_stage_registry.py)."""

from dataclasses import dataclass

from pipeline.config import TrainConfig, stage_config
from pipeline.engine.session import main
from pipeline.engine.stage import Stage


@stage_config("toy_stage")
@dataclass
class ToyStageConfig(TrainConfig):
    stage: str = "toy_stage"
    width: int = 4  # the toy's one setting of its own


class ToyStage(Stage):
    name = "toy_stage"
    schema = ToyStageConfig
    run_inputs = ("asr_run",)  # builds on a train_asr run: a run input no other stage takes


if __name__ == "__main__":
    main(ToyStage)
'''

TOY_YAML = """defaults:
  - toy_stage_schema
  - _self_

stage: toy_stage
width: 8
"""


def entry_point_problems(stages: list[str], entry_points: dict) -> list[str]:
    """What the MLproject lacks for ``stages``: an entry point that launches the stage with the launch parameters."""
    problems = []
    for name in stages:
        entry = entry_points.get(name)
        if entry is None:
            problems.append(f"{name}: no entry point")
        elif not entry["command"].startswith(
            f"python -m pipeline.launcher --nproc={{nproc}} --torchrun={{torchrun}} {name} "
        ):
            problems.append(f"{name}: the command does not run pipeline.launcher {name}")
        elif not LAUNCH_PARAMETERS <= set(entry["parameters"]):
            problems.append(f"{name}: missing parameters {sorted(LAUNCH_PARAMETERS - set(entry['parameters']))}")
    return problems


def mlproject_entry_points() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def test_every_registered_stage_has_its_config_and_entry_point():
    stages = training_stages()
    assert set(stages) == {"train_adapter", "pretrain_vocoder", "finetune_vocoder", "train_asr"}
    for name, module in stages.items():
        cls = stage_class(name)
        assert cls.name == name and cls.schema is stage_schema(name), name
        assert (CONFIG_DIR / f"{name}.yaml").is_file(), name
        assert f"main({cls.__name__})" in Path(importlib.import_module(module).__file__).read_text(), name
        assert compose_config(name, []).stage == name
    assert entry_point_problems(list(stages), mlproject_entry_points()) == []


def test_the_registry_reads_the_config_directory_that_pipeline_config_composes_from():
    assert pipeline.stages.CONFIG_DIR == CONFIG_DIR == REPO / "configs"


def test_a_stage_without_an_entry_point_fails_the_check():
    entry_points = mlproject_entry_points()
    del entry_points["train_asr"]
    assert entry_point_problems(list(training_stages()), entry_points) == ["train_asr: no entry point"]


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """A throwaway stage in two files, its module and its YAML, found where the real ones are looked for."""
    modules, configs = tmp_path / "stages", tmp_path / "configs"
    modules.mkdir()
    configs.mkdir()
    (modules / "toy_stage.py").write_text(TOY_MODULE)
    (configs / "toy_stage.yaml").write_text(TOY_YAML)
    for name in ("train_adapter.yaml", "train_asr.yaml"):  # two real stages, to show they are still found
        (configs / name).write_text((CONFIG_DIR / name).read_text())
    monkeypatch.setattr(pipeline.stages, "__path__", [*pipeline.stages.__path__, str(modules)])
    monkeypatch.setattr(pipeline.stages, "CONFIG_DIR", configs)
    monkeypatch.setattr(composition, "CONFIG_DIR", configs)
    monkeypatch.setattr(composition, "_STAGE_SCHEMAS", dict(composition._STAGE_SCHEMAS))
    yield [modules / "toy_stage.py", configs / "toy_stage.yaml"]
    sys.modules.pop("pipeline.stages.toy_stage", None)


def test_a_throwaway_stage_in_two_files_is_registered_composes_and_takes_its_run_inputs(toy_stage):
    assert [path.name for path in toy_stage] == ["toy_stage.py", "toy_stage.yaml"]  # all that was written
    assert list(training_stages()) == ["toy_stage", "train_adapter", "train_asr"]
    cls = stage_class("toy_stage")
    assert cls.__name__ == "ToyStage" and cls.schema.__name__ == "ToyStageConfig"
    cfg = compose_config("toy_stage", ["batch_size=2"])
    assert (cfg.stage, cfg.width, cfg.batch_size) == ("toy_stage", 8, 2)
    launch = parse_launch(["asr_run=abc", "width=3"], cls.run_inputs)
    assert launch.inputs == {"asr_run": "abc"} and launch.overrides == ["width=3"]
    # the one file left: without its MLproject entry point the registry check fails
    assert entry_point_problems(["toy_stage"], mlproject_entry_points()) == ["toy_stage: no entry point"]


def test_composing_a_stage_config_imports_the_stage_module_that_registers_it(toy_stage):
    assert "pipeline.stages.toy_stage" not in sys.modules
    assert compose_config("toy_stage", []).width == 8  # nothing imported the module before
    assert stage_schema("toy_stage") is sys.modules["pipeline.stages.toy_stage"].ToyStageConfig
