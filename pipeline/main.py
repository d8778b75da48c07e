"""main: the whole restoration chain, each step its own MLflow Project run, chained by run IDs.

    python -m pipeline.main [key=value ...] [<step>.key=value ...] [main.reuse=false]
    mlflow run . -e main --env-manager local -P overrides="trainer.max_steps=50"

Steps: train_adapter -> pretrain_vocoder -> finetune_vocoder (adapter_run and vocoder_run are the
run IDs of the first two). In the spirit of MLflow's multistep workflow example, a step whose
entry point, parameters and code version match a FINISHED run is not trained again: that run is
reused. A matching run that was stopped or crashed is resumed in place (``resume_run``). Every
step run is tagged with the code version and linked to the previous step (``chain.previous_run``);
main's own run (experiment ``main``) holds the chain's run IDs as params and tags. The steps run in
pipeline/ops/chain_steps.py; this module is the command: its settings, the chain registered, evaluated and a
demo file restored, and the summary.

Overrides: configs/main.yaml and its preset (``main.preset=tiny``, the default, or ``quality``:
configs/main/<preset>.yaml) give each step's settings. A word ``key=value`` goes to
every step whose config has that key (one that no step has is an error), ``<step>.key=value`` to
that step only, ``main.<key>=value`` to main's own settings. Everything is checked before any step runs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from omegaconf import OmegaConf

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
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_STOPPED, setup_logging
from pipeline.engine.tracking import (
    LOCAL_UI,
    dashboard_hint,
    default_run_name,
    log_params,
    start_or_adopt_run,
    ui_base,
    ui_url,
)
from pipeline.ops.chain_steps import (
    STEPS,
    STOPPER,
    ChainStopped,
    StepFailed,
    StepResult,
    chain_code_version,
    run_chain,
)

log = logging.getLogger(__name__)

EXPERIMENT = "main"


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
# The chain's closing steps and its summary
# --------------------------------------------------------------------------------------------


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
        "result. For one: python -m pipeline.main main.preset=quality (about 30 min on 2 CPU cores; README, "
        '"What the chain learns").'
    ),
    "quality": (
        "The quality preset: the log-mel front end with its feature cleaner and the Vocos-style generator, trained "
        'on the multi-voice corpus and scored on its held-out voices; README, "What the chain learns", says what '
        "it reaches and what would close the gap."
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
