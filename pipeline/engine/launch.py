"""How a job starts, apart from what it trains: the launch arguments of a training entry point.

The command line of a stage mixes two kinds of words. Launch arguments say where the job starts and
which runs it builds on; they are read here, never stored in the training config, and never compared
between attempts:

- ``resume_run=<run id>``: continue that run, in the same run (its latest committed checkpoint);
- ``resume_step=<step>``: with ``resume_run``, start from that checkpoint (an older one branches);
- ``resume_from=<uri or path>`` (also spelt ``checkpoint.resume_from=``): start from a checkpoint
  anywhere (``runs:/<id>/checkpoints/step-N``, ``s3://...``, a local directory), in a new run;
- the runs a stage builds on (``Stage.run_inputs``, e.g. finetune_vocoder's ``adapter_run=`` and
  ``vocoder_run=``);
- ``resume=auto`` with ``job_key=<name>`` (the Slurm job ID by default): continue the run an earlier launch
  with the same key started, or start one tagged with the key (engine/auto_resume.py);
- ``requeue=exit|scontrol``: after a SIGUSR1 stop, exit with EXIT_REQUEUE (``exit``, the default) or also run
  ``scontrol requeue $SLURM_JOB_ID`` (``scontrol``).

Everything else is a config override (``key=value``). An empty value (``resume_run=``: what an MLproject
parameter the user left out becomes) means "not given".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from pipeline.config import ConfigError, parse_command_line

RESUME_KEYS = ("resume_run", "resume_step", "resume_from", "resume", "job_key", "requeue")
REQUEUE_MODES = ("exit", "scontrol")
_JOB_KEY = re.compile(r"[A-Za-z0-9_.:@/+-]{1,200}")
ALIASES = {"checkpoint.resume_from": "resume_from"}  # the spelling of earlier releases
# The run inputs of the project's stages, known without loading them: given to a stage that does not take it,
# one is refused by name rather than as an unknown config key. A new stage's own run inputs need no entry here.
ALL_RUN_INPUTS = ("adapter_run", "vocoder_run")


@dataclass(frozen=True)
class LaunchArgs:
    overrides: list[str] = field(default_factory=list)  # config overrides, in the order given
    resume_run: str | None = None  # continue this run (same run)
    resume_step: int | None = None  # with resume_run: the checkpoint step to start from
    resume_from: str | None = None  # a checkpoint URI or path to start a new run from
    inputs: dict[str, str] = field(default_factory=dict)  # runs the stage builds on, by name
    auto_resume: bool = False  # resume=auto: continue the run tagged with job_key, if there is one
    job_key: str | None = None  # with auto_resume: the key (given, or the Slurm job's)
    requeue: str = "exit"  # after a SIGUSR1 stop: "exit" (EXIT_REQUEUE) or "scontrol" (requeue the Slurm job too)

    @property
    def resuming(self) -> bool:
        return bool(self.resume_run or self.resume_from)

    @property
    def explicit_step(self) -> bool:
        """The user chose the checkpoint (a step or a URI), rather than "the latest one"."""
        return self.resume_step is not None or bool(self.resume_from)


def parse_launch(argv: list[str] | tuple[str, ...], run_inputs: tuple[str, ...] = ()) -> LaunchArgs:
    """Split a stage's command-line words into launch arguments and config overrides.

    ``run_inputs`` are the run inputs this stage takes. Raises ConfigError for a malformed word, a
    ``resume_step`` that is not a whole number, or another stage's run input.
    """
    line = parse_command_line(argv, RESUME_KEYS + ALL_RUN_INPUTS + tuple(run_inputs), ALIASES)
    launch, overrides = line.launch, line.overrides
    for key, value in launch.items():
        if key in ALL_RUN_INPUTS and key not in run_inputs:
            takes = f"it takes {', '.join(run_inputs)}" if run_inputs else "it builds on no other run"
            raise ConfigError(f"{key + '=' + value!r}: this stage does not build on another run's {key} ({takes})")
    step = launch.get("resume_step")
    if step is not None:
        try:
            step = int(step)
        except ValueError:
            raise ConfigError(
                f"resume_step={step!r} is not a step number; give a checkpoint step such as "
                "resume_step=100 (see the run's checkpoints/index.csv)"
            ) from None
        if step < 0:
            raise ConfigError(f"resume_step={step} must be zero or more")
    auto, key = _auto_resume(launch)
    requeue = launch.get("requeue", "exit")
    if requeue not in REQUEUE_MODES:
        raise ConfigError(
            f"requeue={requeue!r}; choose one of {', '.join(REQUEUE_MODES)} (what a job stopped by "
            "SIGUSR1 does: exit with code 75, or also run `scontrol requeue $SLURM_JOB_ID`)"
        )
    return LaunchArgs(
        overrides=overrides,
        resume_run=launch.get("resume_run"),
        resume_step=step,
        resume_from=launch.get("resume_from"),
        inputs={key: launch[key] for key in run_inputs if key in launch},
        auto_resume=auto,
        job_key=key,
        requeue=requeue,
    )


def _auto_resume(launch: dict[str, str]) -> tuple[bool, str | None]:
    """``resume=auto`` and its job key: the one given, else the Slurm job's (engine/auto_resume.py finds its run)."""
    mode = launch.get("resume")
    if mode not in (None, "auto"):
        raise ConfigError(
            f"resume={mode!r}: the only value is resume=auto (continue the run of this job key, if "
            "any); to continue a run by its ID, pass resume_run=<run id>"
        )
    if mode is None:
        if "job_key" in launch:
            raise ConfigError(
                "job_key= is read only with resume=auto (continue the run an earlier launch with the "
                "same key started); add resume=auto, or leave job_key out"
            )
        return False, None
    if launch.get("resume_run") or launch.get("resume_step"):
        raise ConfigError(
            "resume=auto finds the run by its job key; leave out resume_run/resume_step (or leave "
            "out resume=auto to continue a run by its ID)"
        )
    key = launch.get("job_key") or default_job_key()
    if key is None:
        raise ConfigError(
            "resume=auto needs job_key=<name> (the same name at every launch of this job), or a "
            "Slurm job, whose job ID is the default key"
        )
    return True, check_job_key(key)


def default_job_key(env: dict[str, str] | None = None) -> str | None:
    """The Slurm job's key: ``slurm:<cluster>:<job id>`` (an array task: ``<array job id>_<task id>``), which
    stays the same when Slurm requeues the job; None outside Slurm."""
    env = os.environ if env is None else env
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else env.get("SLURM_JOB_ID")
    if not job:
        return None
    cluster = env.get("SLURM_CLUSTER_NAME")
    return f"slurm:{cluster}:{job}" if cluster else f"slurm:{job}"


def check_job_key(key: str) -> str:
    if not _JOB_KEY.fullmatch(key):
        raise ConfigError(f"job_key={key!r}: use up to 200 letters, digits and _ . : @ / + - (no spaces or quotes)")
    return key
