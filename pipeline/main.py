"""main: the whole restoration chain, each step its own MLflow Project run, chained by run IDs.

    python -m pipeline.main [key=value ...] [<step>.key=value ...] [main.reuse=false]
    mlflow run . -e main --env-manager local -P overrides="trainer.max_steps=50"

Steps: train_adapter -> pretrain_vocoder -> finetune_vocoder (adapter_run and vocoder_run are the
run IDs of the first two). In the spirit of MLflow's multistep workflow example, a step whose
entry point, parameters and code version match a FINISHED run is not trained again: that run is
reused. A matching run that was stopped or crashed is resumed in place (``resume_run``). Every
step run is tagged with the code version and linked to the previous step (``chain.previous_run``);
main's own run (experiment ``main``) holds the chain's run IDs as params and tags.

Overrides: configs/main.yaml and its preset (``main.preset=tiny``, the default, or ``quality``:
configs/main/<preset>.yaml) give each step's settings. A word ``key=value`` goes to
every step whose config has that key (one that no step has is an error), ``<step>.key=value`` to
that step only, ``main.<key>=value`` to main's own settings. Everything is checked before any step runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.projects
import psutil
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.common.provenance import code_version as git_commit
from pipeline.config import (
    CONFIG_DIR,
    ConfigError,
    MainConfig,
    accepts,
    compose_config,
    route_overrides,
    split_overrides,
)
from pipeline.engine import launcher_watch
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import staging_here
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_STOPPED, setup_logging
from pipeline.engine.launcher_watch import note_stop_requested
from pipeline.engine.stopping import SECOND_SIGNAL_GRACE_S
from pipeline.engine.tracking import (
    LOCAL_UI,
    dashboard_hint,
    default_run_name,
    experiment_id,
    log_params,
    start_or_adopt_run,
    ui_base,
    ui_url,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
STEPS = ("train_adapter", "pretrain_vocoder", "finetune_vocoder")
EXPERIMENT = "main"
SOURCE_DIRS = ("pipeline", "configs")


@dataclass
class StepResult:
    step: str
    run_id: str
    how: str  # trained | reused | resumed


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def load_main_config(words: list[str]) -> tuple[MainConfig, list[str]]:
    """configs/main.yaml, its preset (configs/main/<preset>.yaml) and the ``main.*`` words on top; returns it
    and the remaining words."""
    own = [w[len("main.") :] for w in words if w.startswith("main.")]
    try:
        user = OmegaConf.from_dotlist(own)
        base = OmegaConf.merge(OmegaConf.structured(MainConfig), OmegaConf.load(CONFIG_DIR / "main.yaml"), user)
    except Exception as err:  # OmegaConf's validation errors name the key
        raise ConfigError(f"Invalid main override: {err}") from err
    preset = CONFIG_DIR / "main" / f"{base.preset}.yaml"
    if not preset.is_file():
        choices = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "main").glob("*.yaml")))
        raise ConfigError(f"main.preset={base.preset!r}: no such preset; choose one of {choices}")
    return OmegaConf.merge(base, OmegaConf.load(preset), user), [w for w in words if not w.startswith("main.")]


def step_overrides(cfg: MainConfig, words: list[str]) -> dict[str, list[str]]:
    """Each step's overrides: main.yaml's ``common`` (where the step has the key) and its own list,
    then the user's words. Each step's config is composed once as a check."""
    routed = route_overrides(words, STEPS, "step of the chain")
    out = {step: [w for w in cfg.common if accepts(step, w)] + list(cfg[step]) + routed[step] for step in STEPS}
    for step, overrides in out.items():
        try:
            compose_config(step, overrides)
        except ConfigError as err:
            raise ConfigError(f"{step}: {err}") from err
    return out


# --------------------------------------------------------------------------------------------
# Code version and reuse
# --------------------------------------------------------------------------------------------


def source_hash() -> str:
    """sha256 over the package and config files (paths and contents)."""
    digest = hashlib.sha256()
    files = [REPO / "MLproject"] + [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*"))]
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _sources_modified() -> bool:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *SOURCE_DIRS, "MLproject"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    return out.returncode != 0 or bool(out.stdout.strip())


def chain_code_version() -> str:
    """The git commit; with uncommitted changes to the sources, the commit plus a hash of them;
    without git, the hash alone."""
    commit = git_commit()
    if commit is None:
        return f"src-{source_hash()[:16]}"
    return f"{commit}+src-{source_hash()[:12]}" if _sources_modified() else commit


def _param(run, key: str) -> str:
    """A string parameter as given: MLflow Projects log them shell-quoted."""
    value = run.data.params.get(key, "")
    try:
        words = shlex.split(value)
    except ValueError:
        return value
    return words[0] if len(words) == 1 else value if words else ""


def find_run(
    client: MlflowClient, experiment_id: str, step: str, params: dict[str, str], version: str, statuses: tuple[str, ...]
):
    """The newest run of ``step`` with these parameters, this code version and one of ``statuses``."""
    query = (
        f"tags.`mlflow.project.entryPoint` = '{step}' and tags.`chain.code_version` = '{version}' "
        f"and tags.stage = '{step}'"
    )
    for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        if run.info.status in statuses and all(_param(run, k) == v for k, v in params.items()):
            return run
    return None


# --------------------------------------------------------------------------------------------
# Running the steps
# --------------------------------------------------------------------------------------------


class StepFailed(RuntimeError):
    def __init__(self, step: str, run_id: str, code: int):
        what = "was stopped" if code == EXIT_STOPPED else f"ended with exit code {code}"
        super().__init__(f"step {step} (run {run_id}) {what}")
        self.step, self.run_id, self.code = step, run_id, code


class ChainStopped(Exception):
    """A stop signal reached main while no step was running."""


class StopForwarder:
    """main's handler of SIGINT, SIGTERM and SIGHUP. A step runs as an ``mlflow run`` process in a session of
    its own, which no signal to main reaches: the signal is passed to the step's job (the ``mlflow run``
    process's children; the ``mlflow run`` process itself before it has started one, whose end then stops
    the job: engine/launcher_watch.py). The job stops as a job does (its checkpoint committed, its run
    KILLED); main then ends its own run KILLED. A second signal within SECOND_SIGNAL_GRACE_S counts as the
    same request (Ctrl-C reaches main from the terminal and again from `mlflow run`); a later one is passed
    on too (it aborts the step). With no step running, main stops at once (ChainStopped)."""

    def __init__(self):
        self.step: subprocess.Popen | None = None  # the running step's `mlflow run` process
        self.launching = False  # a step is being started: a signal now is passed on once it has started
        self.requested = False
        self._first_at: float | None = None
        self._previous = {}

    def __enter__(self) -> StopForwarder:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        note_stop_requested()
        now = time.monotonic()
        if self._first_at is not None and now - self._first_at <= SECOND_SIGNAL_GRACE_S:
            return
        self._first_at = self._first_at or now
        self.requested = True
        if self.launching:
            return  # launch() passes it on as soon as the step's process exists
        if self.step is None or self.step.poll() is not None:
            raise ChainStopped(name)
        self.forward(signum)

    def forward(self, signum: int) -> None:
        try:
            targets = psutil.Process(self.step.pid).children() or [psutil.Process(self.step.pid)]
        except psutil.Error:
            return  # the step has ended
        log.warning(
            "%s: passing it to the running step (pid %s); main stops when the step has committed its checkpoint",
            signal.Signals(signum).name,
            ", ".join(str(p.pid) for p in targets),
        )
        for proc in targets:
            try:
                proc.send_signal(signum)
            except psutil.Error:
                pass


def wait_for_session(sid: int) -> None:
    """Wait until no process of session ``sid`` is left (the step's job, after its `mlflow run` ended)."""

    def alive() -> bool:
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid:
                    return True
            except OSError:
                continue
        return False

    if alive():
        log.info("Waiting for the step's job to end (session %d)", sid)
        while alive():
            time.sleep(0.5)


STOPPER = StopForwarder()


def launch(
    client: MlflowClient, step: str, params: dict[str, str], version: str, previous: str | None, main_run: str
) -> str:
    """Run one entry point as an MLflow Project run (local environment) and wait for it."""
    STOPPER.launching = True
    try:
        with staging_here():
            submitted = mlflow.projects.run(
                str(REPO),
                entry_point=step,
                parameters=params,
                env_manager="local",
                experiment_name=step,
                synchronous=False,
            )
        STOPPER.step = submitted.command_proc
    finally:
        STOPPER.launching = False
    run_id = submitted.run_id
    try:
        if STOPPER.requested:  # a signal came while the step was being started
            STOPPER.forward(signal.SIGTERM)
        ok = submitted.wait()  # a stop signal meanwhile is passed to the step (StopForwarder)
    finally:
        STOPPER.step = None
    wait_for_session(submitted.command_proc.pid)  # `mlflow run` is a session leader (setsid)
    code = submitted.command_proc.returncode
    # The job's own run: the launched one, or (on resume) the resumed one it logged into.
    job_run = params.get("resume_run") or run_id
    # nested under main's run: its page names main as parent (the step runs stay in their stages' experiments)
    for key, value in {tag.CHAIN_CODE_VERSION: version, tag.CHAIN_MAIN_RUN: main_run, tag.PARENT_RUN: main_run}.items():
        client.set_tag(job_run, key, value)
    if previous:
        client.set_tag(job_run, tag.CHAIN_PREVIOUS_RUN, previous)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        # `mlflow run` exits 1 for any failure, and sets the run FAILED until the job's status guard puts its
        # KILLED back: a stopped job is told by the tag it sets before ending its run
        stopped = tag.STOPPED_BY in client.get_run(job_run).data.tags
        raise StepFailed(step, job_run, EXIT_STOPPED if stopped else code or EXIT_FAILED)
    return job_run


def run_step(
    client: MlflowClient,
    cfg: MainConfig,
    step: str,
    params: dict[str, str],
    version: str,
    previous: str | None,
    main_run: str,
) -> StepResult:
    experiment = experiment_id(client, step)
    if cfg.reuse:
        done = find_run(client, experiment, step, params, version, ("FINISHED",))
        if done is not None:
            log.info(
                "%s: reusing finished run %s (same entry point, parameters and code version)", step, done.info.run_id
            )
            return StepResult(step, done.info.run_id, "reused")
    if cfg.resume:
        stopped = find_run(client, experiment, step, params, version, ("KILLED", "FAILED"))
        if stopped is not None and stopped.data.tags.get(tag.CHECKPOINT_LATEST_STEP):
            log.info("%s: resuming stopped run %s from its checkpoint", step, stopped.info.run_id)
            run_id = launch(client, step, {**params, "resume_run": stopped.info.run_id}, version, previous, main_run)
            return StepResult(step, run_id, "resumed")
    log.info("%s: starting a new run", step)
    return StepResult(step, launch(client, step, params, version, previous, main_run), "trained")


def run_chain(
    client: MlflowClient, cfg: MainConfig, overrides: dict[str, list[str]], version: str, main_run: str
) -> list[StepResult]:
    results: dict[str, StepResult] = {}
    previous = None
    for step in STEPS:
        params = {"overrides": shlex.join(overrides[step])}  # the step splits it again with shell rules
        if step == "finetune_vocoder":
            params.update(adapter_run=results["train_adapter"].run_id, vocoder_run=results["pretrain_vocoder"].run_id)
        result = run_step(client, cfg, step, params, version, previous, main_run)
        results[step] = result
        client.set_tag(main_run, tag.chain_step(step), result.run_id)
        previous = result.run_id
    return list(results.values())


def register_chain(client: MlflowClient, finetune_run: str) -> str | None:
    """The chain's registered model URI: a new ``speech-restoration`` version for a chain not registered
    yet, the existing one for a reused chain; None (with a warning) when the run has no ``model/``."""
    from pipeline.inference.chain import MODEL_NAME

    existing = client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{finetune_run}'")
    if existing:
        return f"models:/{MODEL_NAME}/{max(int(v.version) for v in existing)}"
    if not any(a.path == "model" for a in client.list_artifacts(finetune_run)):
        log.warning(
            "finetune_vocoder run %s has no model/ (tracking.log_model=false?); the chain is not registered",
            finetune_run,
        )
        return None
    version = mlflow.register_model(f"runs:/{finetune_run}/model", MODEL_NAME).version
    log.info("Registered the chain as models:/%s/%s", MODEL_NAME, version)
    return f"models:/{MODEL_NAME}/{version}"


def evaluate_chain(cfg: MainConfig, finetune_run: str) -> int:
    """The closing evaluation (pipeline/evaluate.py) of the chain, in an evaluate run of its own."""
    from pipeline import evaluate

    return evaluate.run([f"run_id={finetune_run}", *cfg.evaluate], adopt_launcher=False)


def restore_demo(finetune_run: str, output: str) -> Path | None:
    """One held-out demo utterance, degraded as evaluate degrades it, restored into ``output``."""
    import soundfile as sf

    from pipeline import restore
    from pipeline.data.audio import load_audio
    from pipeline.data.corpus import read_corpus
    from pipeline.data.datasets import VAL_STREAM
    from pipeline.data.degrade import degrade, sample_rng

    utterance = read_corpus("ljspeech", None)[-1]
    noisy, _ = degrade(
        load_audio(utterance.path, 16000),
        16000,
        compose_config("finetune_vocoder", []).degradation,
        sample_rng(1234, 0, 0, VAL_STREAM),
    )
    out = Path(output).expanduser().resolve()
    source = out / "input" / f"{Path(utterance.id).name}_degraded.wav"
    source.parent.mkdir(parents=True, exist_ok=True)
    sf.write(source, noisy.numpy(), 16000)
    if restore.run([f"run_id={finetune_run}", f"input={source}", f"output={out}", "overwrite=true"]) != EXIT_OK:
        return None
    return out / source.name


def _main_run(client: MlflowClient, overrides: dict[str, list[str]]) -> str:
    """The run `mlflow run -e main` created, or a new one in experiment `main`, named after what the chain
    trains: ``<id>-restoration-chain-<encoder>-<dataset>``."""
    adapter = compose_config("train_adapter", overrides["train_adapter"])
    return start_or_adopt_run(
        client,
        experiment=EXPERIMENT,
        tags={tag.STAGE: "main", tag.MODEL: adapter.ssl.name, tag.DATASET: adapter.data.name},
        run_name=lambda run_id: default_run_name(run_id, "restoration-chain", adapter.ssl.name, adapter.data.name),
        launcher=os.environ.get("MLFLOW_RUN_ID"),
    )


def _step_link(client: MlflowClient, run_id: str) -> str:
    """A Markdown link to a step's run page, named as the run is."""
    run = client.get_run(run_id)
    return f"[{run.info.run_name}]({ui_url(run.info.experiment_id, run_id)})"


def describe_chain(client: MlflowClient, results: list[StepResult], model: str | None) -> str:
    """main's run description: the steps as links to their runs, the registered model."""
    lines = [
        "**Restoration chain** · " + " → ".join(f"{r.step} ({r.how})" for r in results),
        "",
        "| step | run | how |",
        "|---|---|---|",
    ]
    lines += [f"| {r.step} | {_step_link(client, r.run_id)} | {r.how} |" for r in results]
    if model:
        lines += ["", f"Registered model: `{model}`"]
    return "\n".join(lines)


PRESET_NOTES = {  # what the numbers of a preset mean, printed under the chain's summary
    "tiny": (
        "The tiny preset shows every step working end to end in minutes; its numbers are not a quality "
        "result. For one: python -m pipeline.main main.preset=quality (about 25 min on 2 CPU cores; README, "
        '"What the chain learns").'
    ),
    "quality": (
        'The quality preset on the demo corpus, with a random encoder: README, "What the chain learns", '
        "says what it reaches and what closes the gap (a pretrained encoder, a GPU, a real corpus)."
    ),
}


def report(
    client: MlflowClient,
    results: list[StepResult],
    main_run: str,
    model: str | None = None,
    restored: Path | None = None,
    preset: str = "",
) -> str:
    lines = [f"{r.step:<18} {r.run_id}  ({r.how})" for r in results]
    return "\n".join(
        [
            "",
            "Restoration chain finished:",
            *lines,
            f"{'main':<18} {main_run}",
            *([f"{'model':<18} {model} (registered; the best one scored: {champion_uri()})"] if model else []),
            *([f"{'restored demo':<18} {restored} (its degraded input beside it in input/)"] if restored else []),
            "",
            f"Dashboard: {dashboard_hint(client.get_run(main_run).info.experiment_id, main_run)}",
            *[
                f"  {r.step:<16} {ui_url(client.get_run(r.run_id).info.experiment_id, base=ui_base() or LOCAL_UI)}"
                for r in results
            ],
            *(["", PRESET_NOTES[preset]] if preset in PRESET_NOTES else []),
            "",
        ]
    )


def champion_uri() -> str:
    from pipeline.inference.chain import MODEL_NAME
    from pipeline.inference.registry import CHAMPION

    return f"models:/{MODEL_NAME}@{CHAMPION}"


def main(argv: list[str]) -> int:
    setup_logging()
    launcher_watch.watch()  # main stops, and stops its step, when `mlflow run -e main` is gone
    before = os.environ.get(launcher_watch.ALSO_WATCH_ENV)
    os.environ[launcher_watch.ALSO_WATCH_ENV] = str(os.getpid())  # and a step stops if main itself is killed
    try:
        with STOPPER:
            return run_main(argv)
    finally:  # main may run inside another program (a test): leave its environment as it was
        if before is None:
            os.environ.pop(launcher_watch.ALSO_WATCH_ENV, None)
        else:
            os.environ[launcher_watch.ALSO_WATCH_ENV] = before


def parse_args(argv: list[str]) -> tuple[MainConfig, dict[str, list[str]]]:
    """main's settings and each step's overrides, checked before any step runs (its evaluation's words too)."""
    cfg, words = load_main_config(split_overrides(argv))
    overrides = step_overrides(cfg, words)
    if cfg.evaluate:
        from pipeline.evaluate import parse_args as evaluate_args

        evaluate_args(["run_id=(the finetune_vocoder run)", *cfg.evaluate])  # a typo fails before any step
    return cfg, overrides


def run_main(argv: list[str]) -> int:
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")  # `python` = ours
    try:
        cfg, overrides = parse_args(argv)
    except ConfigError as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    client = MlflowClient()
    version = chain_code_version()
    main_run = _main_run(client, overrides)
    log_params(
        client, main_run, {f"{s}.overrides": " ".join(o) for s, o in overrides.items()} | {"code_version": version}
    )
    status, code = "FAILED", EXIT_FAILED
    try:
        results = run_chain(client, cfg, overrides, version, main_run)
        if STOPPER.requested:  # the signal came as the last step ended
            raise ChainStopped("a stop signal")
        model = register_chain(client, results[-1].run_id)
        if model:
            client.set_tag(main_run, tag.CHAIN_MODEL, model)
        if cfg.evaluate and evaluate_chain(cfg, results[-1].run_id) != EXIT_OK:
            log.warning("The chain is trained but its evaluation failed (see above)")
        restored = restore_demo(results[-1].run_id, cfg.restore_output) if cfg.restore_output else None
        status, code = "FINISHED", EXIT_OK
        client.set_tag(main_run, tag.CHAIN_REUSED, ",".join(r.step for r in results if r.how == "reused") or "none")
        client.set_tag(main_run, tag.NOTE, describe_chain(client, results, model))
        sys.stdout.write(report(client, results, main_run, model, restored, cfg.preset))
    except StepFailed as err:
        log.error("%s; run main again to resume it", err)
        status, code = ("KILLED", EXIT_STOPPED) if err.code == EXIT_STOPPED else ("FAILED", err.code)
    except ChainStopped as err:
        log.warning("Stopped by %s; run main again to go on", err)
        status, code = "KILLED", EXIT_STOPPED
    finally:
        client.set_terminated(main_run, status)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
