"""Score a trained chain (or an ASR model) on a test set, in an MLflow run of its own.

    python -m pipeline.evaluate run_id=<finetune_vocoder run> [asr_run=<train_asr run>] [data=demo] [seed=1234]
    python -m pipeline.evaluate model_uri=models:/speech-restoration/3 noisy_dir=recordings/
    python -m pipeline.evaluate run_id=<train_asr run>
    python -m pipeline.evaluate run_id=<finetune_vocoder or pretrain_vocoder run> steps=all
    mlflow run . -e evaluate --env-manager local -P run_id=<id>

Chain mode: the last ``test_size`` utterances of a corpus (by default the demo corpus's held-out split,
the one training validates on) are degraded with a fixed seed and scored in three conditions against
the clean reference: ``degraded`` (the input), ``restored`` (the chain) and ``copy_synthesis`` (the
vocoder on the clean features: the ceiling). Metrics (pipeline/inference/metrics.py): PESQ wide band, STOI,
ESTOI, SI-SDR, log-spectral distance, DNSMOS SIG/BAK/OVRL, and with ``asr_run`` the CER/WER of that
train_asr run's model. With ``noisy_dir`` (real recordings, no references): the non-intrusive metrics
and transcripts of ``input`` and ``restored``. For a train_asr ``run_id``: CER/WER on ``clean`` and
``degraded`` audio. A pretrain_vocoder ``run_id``: ``copy_synthesis`` (and ``degraded``) only.

Learning curves: ``steps=all`` (or ``steps=500,1000``) scores each of those checkpoints of the run and logs
the metrics at the checkpoint's step (``eval/curves.png`` plots them); checkpoint-free conditions are scored once.

The ``evaluate`` run holds a per-file table (``eval/files.json``), summary metrics
``eval/<condition>/<metric>`` and ``eval/delta/<metric>`` (restored minus degraded), a plot per metric
and a listening page; it is tagged with the runs it evaluated, and they with it (``evaluation.run``).
The same evaluation again (same runs and checkpoint steps, test set, seed) reuses the finished run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torchaudio.functional as AF
from mlflow import MlflowClient
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.config import CONFIG_DIR, ConfigError, DataConfig, DegradationConfig, parse_key_values
from pipeline.data.audio import AudioError, audio_files, load_audio, read_channels
from pipeline.data.corpus import CorpusError, LoadReport, corpus_dataset, mlflow_dataset, read_corpus
from pipeline.data.datasets import VAL_STREAM
from pipeline.data.degrade import degrade, sample_rng
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.checkpointing import list_checkpoints
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, setup_logging
from pipeline.engine.resume import ResumeError, RunCheckpoints
from pipeline.engine.stage import Precision
from pipeline.engine.tracking import experiment_id, log_dataset_inputs, start_or_adopt_run, ui_url
from pipeline.inference import metrics as M
from pipeline.inference import registry
from pipeline.inference.chain import load_chain, resolve_chain
from pipeline.inference.chain_checkpoints import CHAIN_STAGE, VOCODER_STAGE, stored_steps
from pipeline.inference.listening import Example, write_listening_page
from pipeline.inference.summary import describe_evaluation, text_table, verdict
from pipeline.models.asr import error_counts

log = logging.getLogger(__name__)

EXPERIMENT = "evaluate"
LISTEN = 4  # files on the listening page


@dataclass
class EvaluateConfig:
    run_id: str | None = None  # a finetune_vocoder run (chain) or a train_asr run (ASR only)
    model_uri: str | None = None  # or a speech-restoration model: models:/speech-restoration/<v>, runs:/<id>/model
    checkpoint: str = "latest"  # with run_id: latest | best | a step number
    steps: str = ""  # with run_id: several checkpoints, scored by step (learning curves): all | 500,1000,2000
    data: str = "demo"  # data preset (configs/data/<name>.yaml) of the clean test utterances
    data_root: str | None = None  # its corpus directory (the demo corpus needs none)
    test_size: int = 4  # the last N utterances of the corpus: the held-out split (data.val_size in training)
    degradation: str = "default"  # degradation preset (configs/degradation/<name>.yaml)
    seed: int = 1234  # the degradation of file i is drawn from (seed, i): the same test set every time
    noisy_dir: str | None = None  # real noisy recordings (no references): non-intrusive metrics only
    asr_run: str | None = None  # a train_asr run whose model transcribes every condition (CER/WER)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    reuse: bool = True  # reuse a finished run of the same evaluation


@dataclass
class Item:
    """One test file: its name, reference text and each condition's audio at 16 kHz."""

    name: str
    text: str
    audio: dict[str, np.ndarray]


def parse_args(argv: list[str]) -> EvaluateConfig:
    """``key=value`` words (the one grammar: ``config.parse_key_values``), checked."""
    cfg = parse_key_values(EvaluateConfig, argv)
    if bool(cfg.run_id) == bool(cfg.model_uri):
        raise ConfigError("Give exactly one of run_id=<finetune_vocoder or train_asr run> or model_uri=<models:/…>")
    if cfg.checkpoint not in ("latest", "best") and not cfg.checkpoint.isdigit():
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}; choose latest, best or a step number")
    if cfg.steps:
        if not cfg.run_id:
            raise ConfigError(
                "steps= scores several checkpoints of one run: give run_id=<finetune_vocoder or "
                "pretrain_vocoder run>, not model_uri"
            )
        if cfg.steps != "all" and not all(w.strip().isdigit() for w in cfg.steps.split(",")):
            raise ConfigError(f"steps={cfg.steps!r}; give all or step numbers separated by commas (steps=500,1000)")
    if cfg.test_size < 1:
        raise ConfigError(f"test_size={cfg.test_size} must be at least 1")
    return cfg


def _preset(group: str, name: str, schema: type):
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.exists():
        choices = ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
        raise ConfigError(f"{group}={name!r}: no such preset; choose one of {choices}")
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))


def test_utterances(cfg: EvaluateConfig):
    data = _preset("data", cfg.data, DataConfig)
    utterances = read_corpus(data.format, cfg.data_root or data.root, data.subsets)
    if len(utterances) < cfg.test_size:
        raise ConfigError(f"test_size={cfg.test_size} but the corpus has {len(utterances)} utterances")
    return utterances[-cfg.test_size :]


def check_usable(paths: list[Path], what: str, advice: str) -> None:
    """Read every file of the test set once: files that are not usable audio are counted by reason and
    skipped later; AudioError (one message: the counts, an example, ``advice``) when none is usable."""
    report = LoadReport(len(paths))
    for path in paths:
        try:
            read_channels(path)
        except AudioError as err:
            report.skip(err)
    if sum(report.skipped.values()) == len(paths):
        example = next(iter(report.examples.values()))[0]
        raise AudioError(
            f"Nothing to evaluate: none of the {len(paths)} audio files of {what} is usable "
            f"({report.summary()}; e.g. {example}). {advice}",
            "missing",
        )
    report.log()


# --------------------------------------------------------------------------------------------
# What is evaluated
# --------------------------------------------------------------------------------------------


class Transcriber:
    """A train_asr run's model (its latest checkpoint): greedy transcripts of 16 kHz audio."""

    def __init__(self, client: MlflowClient, run_id: str, device: torch.device, workdir: Path):
        from pipeline.inference.asr import checkpoint_from_run, load_model

        self.model, self.vocab, meta = load_model(
            checkpoint_from_run(client, run_id, "latest", workdir / "asr"), device
        )
        self.rate, self.step, self.device = int(meta["model_args"]["asr"]["sample_rate"]), int(meta["step"]), device

    def __call__(self, wave: np.ndarray) -> str:
        from pipeline.inference.asr import transcribe

        x = torch.from_numpy(np.asarray(wave, dtype=np.float32))
        if self.rate != M.RATE:
            x = AF.resample(x, M.RATE, self.rate)
        return transcribe(self.model, self.vocab, [x], self.device)[0]


def _stage_of(client: MlflowClient, run_id: str) -> str:
    try:
        return client.get_run(run_id).data.tags.get(tag.STAGE, "")
    except Exception:
        return ""  # RunCheckpoints says what is wrong


def _to_16k(wave: torch.Tensor, rate: int) -> np.ndarray:
    return (AF.resample(wave, rate, M.RATE) if rate != M.RATE else wave).numpy()


def chain_items(chain, cfg: EvaluateConfig) -> list[Item]:
    degradation = _preset("degradation", cfg.degradation, DegradationConfig)
    items = []
    for index, utt in enumerate(
        tqdm(test_utterances(cfg), desc="restore", unit="file", disable=not sys.stderr.isatty())
    ):
        try:
            clean = load_audio(utt.path, chain.rate_in)
        except AudioError:
            continue  # counted and logged by check_usable
        noisy, _ = degrade(clean, chain.rate_in, degradation, sample_rng(cfg.seed, 0, index, VAL_STREAM))
        noisy = noisy.float()
        audio = {"clean": _to_16k(clean, chain.rate_in), "degraded": _to_16k(noisy, chain.rate_in)}
        if chain.has_adapters:  # a pretrain_vocoder checkpoint has none: copy synthesis only
            audio["restored"] = _to_16k(chain.restore(noisy, chain.rate_in), chain.rate_out)
        audio["copy_synthesis"] = _to_16k(chain.copy_synthesis(clean, chain.rate_in), chain.rate_out)
        items.append(Item(Path(utt.id).name, utt.text, audio))
    return items


def relative_name(path: Path, root: str) -> str:
    """A file's name in the table: its path under ``root`` (``sub/a.wav``: files of subfolders keep them apart)."""
    base = Path(root).expanduser()
    return path.name if base.is_file() else path.relative_to(base).as_posix()


def noisy_items(chain, cfg: EvaluateConfig) -> list[Item]:
    items = []
    for path in tqdm(audio_files(cfg.noisy_dir), desc="restore", unit="file", disable=not sys.stderr.isatty()):
        try:
            audio, rate = read_channels(path)
        except AudioError:
            continue  # counted and logged by check_usable
        mono = audio.mean(dim=0)
        items.append(
            Item(
                relative_name(path, cfg.noisy_dir),
                "",
                {"input": _to_16k(mono, rate), "restored": _to_16k(chain.restore(mono, rate), chain.rate_out)},
            )
        )
    return items


def asr_items(cfg: EvaluateConfig) -> list[Item]:
    degradation = _preset("degradation", cfg.degradation, DegradationConfig)
    items = []
    for index, utt in enumerate(test_utterances(cfg)):
        try:
            clean = load_audio(utt.path, M.RATE)
        except AudioError:
            continue  # counted and logged by check_usable
        noisy, _ = degrade(clean, M.RATE, degradation, sample_rng(cfg.seed, 0, index, VAL_STREAM))
        items.append(Item(Path(utt.id).name, utt.text, {"clean": clean.numpy(), "degraded": noisy.float().numpy()}))
    return items


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score(
    items: list[Item], transcriber: Transcriber | None, quality: bool, skip: tuple[str, ...] = ()
) -> pd.DataFrame:
    """One row per file and condition (but those in ``skip``): every metric that applies (NaN where undefined)."""
    rows = []
    for item in tqdm(items, desc="score", unit="file", disable=not sys.stderr.isatty()):
        reference = item.audio.get("clean")
        for condition, wave in item.audio.items():
            if (condition == "clean" and quality) or condition in skip:
                continue  # the reference itself, or scored already
            row = {"file": item.name, "condition": condition, "text": item.text}
            if quality:
                if reference is not None:
                    row.update(M.intrusive(reference, wave))
                row.update(M.dnsmos(wave))
            if transcriber is not None:
                hypothesis = transcriber(wave)
                row["transcript"] = hypothesis
                if item.text:
                    counts = error_counts([hypothesis], [transcriber.vocab.normalize(item.text)])
                    row.update({name: edits / max(total, 1) for name, (edits, total) in counts.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> dict[str, float]:
    """``eval/<condition>/<metric>`` means over files (NaN ignored) and ``eval/delta/<metric>`` restored - degraded."""
    columns = [c for c in table.columns if c in M.HIGHER_IS_BETTER]
    means = table.groupby("condition")[columns].mean(numeric_only=True)
    out = {
        f"eval/{cond}/{metric}": float(value)
        for cond, row in means.iterrows()
        for metric, value in row.items()
        if not math.isnan(value)
    }
    before = "degraded" if "degraded" in means.index else "input"
    if "restored" in means.index and before in means.index:
        for metric in columns:
            delta = means.loc["restored", metric] - means.loc[before, metric]
            if not math.isnan(delta):
                out[f"eval/delta/{metric}"] = float(delta)
    return out


def plot_curves(table: pd.DataFrame, path: Path) -> None:
    """Each metric's mean over files against the checkpoint step, a line per condition (``steps=``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in M.HIGHER_IS_BETTER if c in table.columns and table[c].notna().any()]
    means = table.groupby(["condition", "step"], sort=False)[columns].mean(numeric_only=True)
    fig, axes = plt.subplots(1, len(columns), figsize=(2.8 * len(columns), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], columns):
        for index, condition in enumerate(table["condition"].unique()):
            curve = means.loc[condition, metric].sort_index()
            ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3, color=f"C{index}", label=condition)
        ax.set_xlabel("checkpoint step", fontsize=8)
        ax.set_title(f"{metric} ({'higher' if M.HIGHER_IS_BETTER[metric] else 'lower'} is better)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in M.HIGHER_IS_BETTER if c in table.columns and table[c].notna().any()]
    means = table.groupby("condition", sort=False)[columns].mean(numeric_only=True)
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], columns):
        ax.bar(range(len(means)), means[metric].to_numpy(), color=[f"C{i}" for i in range(len(means))])
        ax.set_xticks(range(len(means)), means.index, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({'higher' if M.HIGHER_IS_BETTER[metric] else 'lower'} is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def evaluation_key(what: dict[str, str], cfg: EvaluateConfig) -> str:
    settings = {
        k: v for k, v in asdict(cfg).items() if k not in ("run_id", "model_uri", "checkpoint", "device", "reuse")
    }
    return hashlib.sha256(json.dumps({**what, **settings}, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_evaluation(client: MlflowClient, key: str):
    found = client.search_runs(
        [experiment_id(client, EXPERIMENT)],
        f"tags.`{tag.EVAL_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def print_summary(metrics: dict[str, float], run_id: str, page: str) -> None:
    lines = ["", *text_table(metrics)]
    if sentence := verdict(metrics):
        lines += ["", sentence]
    lines += ["", f"Evaluation run {run_id}; listening page: {page}", ""]
    sys.stdout.write("\n".join(lines))


@dataclass
class Plan:
    """What one evaluation scores, decided before any run is written."""

    cfg: EvaluateConfig
    mode: str  # chain | noisy | asr | vocoder (a pretrain_vocoder run: copy synthesis only)
    steps: list  # the vocoder checkpoints scored, in order (latest/best or step numbers); [None] in asr mode
    what: dict[str, str]  # the runs and steps evaluated (with the settings, the evaluation key)
    key: str
    chain: object | None  # RestorationChain of the first of ``steps`` (chain, noisy and vocoder modes)
    transcriber: Transcriber | None
    asr_run: str | None


def evaluated_steps(client: MlflowClient, cfg: EvaluateConfig) -> list:
    """The checkpoints to score: the one ``checkpoint`` names, or ``steps`` (each still stored)."""
    if not cfg.steps:
        return [int(cfg.checkpoint) if cfg.checkpoint.isdigit() else cfg.checkpoint]
    run = RunCheckpoints(client, cfg.run_id, (CHAIN_STAGE, VOCODER_STAGE))
    run.require_committed("evaluate")
    if cfg.steps == "all":
        return list_checkpoints(client, cfg.run_id)
    return stored_steps(run, sorted({int(w) for w in cfg.steps.split(",")}))


def plan(cfg: EvaluateConfig, client: MlflowClient, workdir: Path) -> Plan:
    """Load what is evaluated and check the test set; every bad input surfaces here (nothing is written)."""
    precision = Precision.from_config(cfg.device, "32")
    stage = _stage_of(client, cfg.run_id) if cfg.run_id else ""
    mode = (
        "asr"
        if stage == "train_asr"
        else "noisy"
        if cfg.noisy_dir
        else "vocoder"
        if stage == VOCODER_STAGE
        else "chain"
    )
    if stage == VOCODER_STAGE and cfg.noisy_dir:
        raise ConfigError(
            f"Run {cfg.run_id} is a pretrain_vocoder run: it has no adapters to restore noisy_dir "
            "with; give its finetune_vocoder run"
        )
    if mode == "asr" and cfg.steps:
        raise ConfigError("steps= scores restoration checkpoints; a train_asr run is evaluated at its latest")
    asr_run = cfg.run_id if mode == "asr" else cfg.asr_run
    transcriber = Transcriber(client, asr_run, precision.device, workdir) if asr_run else None
    what, chain, steps = {"mode": mode}, None, [None]
    if mode != "asr":
        steps = evaluated_steps(client, cfg)
        source = resolve_chain(client, cfg.run_id, cfg.model_uri, steps[0], workdir, vocoder_only=True)
        chain = load_chain(source, precision)
        what.update(
            {k: source.metadata.get(k, "") for k in ("vocoder_run", "vocoder_step", "adapter_run", "adapter_step")}
        )
        if cfg.steps:
            what["vocoder_step"] = ",".join(map(str, steps))
    if transcriber is not None:
        what.update(asr_run=asr_run, asr_step=str(transcriber.step))
    if mode == "noisy":
        files = audio_files(cfg.noisy_dir)
        what["noisy_files"] = ",".join(f"{p}:{p.stat().st_size}" for p in files)
        check_usable(
            files,
            f"noisy_dir={cfg.noisy_dir}",
            "Give a directory of recordings that soundfile reads (WAV, FLAC, OGG, MP3), not empty, silent or NaN.",
        )
    else:  # a missing corpus, a too small one, or one whose test files cannot be read
        check_usable(
            [utt.path for utt in test_utterances(cfg)],
            f"the last test_size={cfg.test_size} utterances of data={cfg.data}",
            "Check the corpus (data_root=) or choose another data= or test_size=.",
        )
    return Plan(cfg, mode, steps, what, evaluation_key(what, cfg), chain, transcriber, asr_run)


MODEL_FREE = ("clean", "degraded", "input")  # conditions that do not depend on the checkpoint: scored once


def _chain_at(client: MlflowClient, p: Plan, index: int):
    """The chain of ``p.steps[index]`` (the first is loaded by ``plan``)."""
    if index == 0:
        return p.chain
    with tempfile.TemporaryDirectory(prefix="evaluate-") as workdir:  # load_chain reads the checkpoints whole
        source = resolve_chain(client, p.cfg.run_id, None, p.steps[index], Path(workdir), vocoder_only=True)
        return load_chain(source, p.chain.precision)


def evaluate_in_run(client: MlflowClient, p: Plan, run_id: str) -> dict[str, float]:
    """Restore and score the test set at each of ``p.steps`` (metrics logged at that step with ``steps=``, at 0
    otherwise), and log the table, plots and listening page (of the last step) into ``run_id``."""
    by_step = bool(p.cfg.steps)
    tables, fixed = [], None
    for index, step in enumerate(p.steps):
        chain = _chain_at(client, p, index)
        items = (
            asr_items(p.cfg)
            if p.mode == "asr"
            else noisy_items(chain, p.cfg)
            if p.mode == "noisy"
            else chain_items(chain, p.cfg)
        )
        table = score(items, p.transcriber, quality=p.mode != "asr", skip=() if fixed is None else MODEL_FREE)
        if fixed is None:
            fixed = table[table["condition"].isin(MODEL_FREE)]
        else:
            table = pd.concat([fixed, table], ignore_index=True)
        metrics = summary(table)
        client.log_batch(
            run_id, metrics=[mlflow.entities.Metric(k, v, 0, int(step) if by_step else 0) for k, v in metrics.items()]
        )
        if by_step:
            log.info(
                "Step %s: %s",
                step,
                ", ".join(
                    f"{k.removeprefix('eval/')} {v:.3f}"
                    for k, v in metrics.items()
                    if k.endswith(("/stoi", "/pesq_wb", "/dnsmos_ovrl"))
                ),
            )
            table.insert(0, "step", int(step))
        tables.append(table)
    client.log_table(run_id, pd.concat(tables, ignore_index=True), "eval/files.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot(table.drop(columns="step", errors="ignore"), Path(tmp) / "conditions.png")
        client.log_artifact(run_id, str(Path(tmp) / "conditions.png"), "eval")
        if by_step:
            plot_curves(pd.concat(tables, ignore_index=True), Path(tmp) / "curves.png")
            client.log_artifact(run_id, str(Path(tmp) / "curves.png"), "eval")
        examples = [Example(item.name, item.text, dict(item.audio)) for item in items[:LISTEN]]
        step_note = f" · step {p.steps[-1]}" if by_step else ""
        write_listening_page(Path(tmp) / "listening", f"evaluate · {p.mode}{step_note} · {p.key}", examples, M.RATE)
        client.log_artifacts(run_id, str(Path(tmp) / "listening"), "listening")
    return metrics


def test_set_text(p: Plan) -> str:
    """The test set in words, the same for every evaluation of it (the registry compares versions by it)."""
    cfg = p.cfg
    if p.mode == "noisy":
        count = len(p.what["noisy_files"].split(","))
        return f"{count} recordings of noisy_dir={cfg.noisy_dir} (no references: non-intrusive metrics only)"
    test = f"the last {cfg.test_size} utterances of data={cfg.data}"
    return test if p.mode == "asr" else f"{test}, degradation={cfg.degradation}, seed={cfg.seed}"


def test_dataset(p: Plan):
    """The test set as an MLflow dataset, logged as the evaluation run's input."""
    cfg = p.cfg
    if p.mode == "noisy":
        digest = hashlib.sha256(p.what["noisy_files"].encode()).hexdigest()[:16]
        return mlflow_dataset(cfg.noisy_dir, "noisy_dir", digest)
    data = _preset("data", cfg.data, DataConfig)
    return corpus_dataset(f"{cfg.data}-test", cfg.data_root or data.root, test_utterances(cfg))


def _run_link(client: MlflowClient, run_id: str) -> str:
    run = client.get_run(run_id)
    return f"[{run.info.run_name}]({ui_url(run.info.experiment_id, run_id)}) (`{run_id}`)"


def evaluated_items(client: MlflowClient, p: Plan) -> list[str]:
    """What was evaluated, as Markdown items linking to the runs (the runs link back with evaluation.run)."""
    items = []
    if p.cfg.model_uri:
        items.append(f"model `{p.cfg.model_uri}`")
    for role, run_key, step_key in (
        ("vocoder", "vocoder_run", "vocoder_step"),
        ("adapters", "adapter_run", "adapter_step"),
        ("speech recognizer (CER/WER)", "asr_run", "asr_step"),
    ):
        run_id = p.what.get(run_key)
        if run_id:
            step = p.what.get(step_key, "")
            items.append(f"{role}: {_run_link(client, run_id)}" + (f", checkpoint step {step}" if step else ""))
    return items


def record_in_registry(
    client: MlflowClient, p: Plan, metrics: dict[str, float], run_id: str, evaluated: list[str]
) -> str | None:
    """The registered chain this evaluation scored (chain mode, the latest checkpoint: the model a finetune_vocoder
    run exports): its description, tags and @champion (pipeline/inference/registry.py); its version or None.
    ``evaluated``: ``evaluated_items``."""
    if p.mode != "chain" or p.cfg.steps or p.cfg.checkpoint != "latest":
        return None
    version = registry.registered_version(client, p.cfg.model_uri, p.cfg.run_id)
    if version is None:
        return None
    chain = [item for item in evaluated if not item.startswith("model ")]
    try:
        log.info(
            "Model Registry: %s", registry.record_evaluation(client, version, metrics, run_id, test_set_text(p), chain)
        )
    except Exception as err:  # the evaluation itself is done and stored; the registry record is an extra
        log.warning("Could not record the evaluation on models:/%s/%s (%s)", registry.MODEL_NAME, version, err)
    return version


def run(argv: list[str], adopt_launcher: bool = True) -> int:
    """The command; ``adopt_launcher=False`` when called in-process by another entry point (main), whose
    ``mlflow run`` run must not become the evaluation run."""
    setup_logging()
    client = MlflowClient()
    try:
        with tempfile.TemporaryDirectory(prefix="evaluate-") as workdir:  # plan() loads the checkpoints whole
            p = plan(parse_args(argv), client, Path(workdir))
    except (ConfigError, ResumeError, CheckpointError, AudioError, CorpusError, ValueError, OSError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    done = finished_evaluation(client, p.key) if p.cfg.reuse else None
    if done is not None:
        log.info(
            "Reusing finished evaluation run %s (same runs, checkpoint steps, test set and seed)", done.info.run_id
        )
        launcher = os.environ.get("MLFLOW_RUN_ID") if adopt_launcher else None
        if launcher:  # the run `mlflow run` made for this command points at the evaluation it reused
            client.set_tag(launcher, tag.EVALUATION_RUN, done.info.run_id)
            client.set_tag(launcher, tag.NOTE, f"Reused the finished evaluation run {done.info.run_id}.")
        record_in_registry(client, p, done.data.metrics, done.info.run_id, evaluated_items(client, p))
        print_summary(done.data.metrics, done.info.run_id, f"runs:/{done.info.run_id}/listening/index.html")
        return EXIT_OK

    tags = {
        tag.STAGE: EXPERIMENT,
        tag.EVAL_KEY: p.key,
        tag.EVAL_MODE: p.mode,
        tag.MODEL: "hifigan" if p.chain else "conformer-ctc",
        tag.DATASET: "noisy_dir" if p.mode == "noisy" else p.cfg.data,
    }
    links = {
        tag.EVAL_VOCODER_RUN: p.what.get("vocoder_run"),
        tag.EVAL_ADAPTER_RUN: p.what.get("adapter_run"),
        tag.EVAL_ASR_RUN: p.asr_run,
        tag.EVAL_MODEL: p.cfg.model_uri,
    }
    run_id = start_or_adopt_run(
        client,
        experiment=EXPERIMENT,
        run_name=f"{p.key[:6]}-evaluate-{p.mode}",
        tags={**tags, **{k: v for k, v in links.items() if v}},
        params={**asdict(p.cfg), **p.what},
        launcher=os.environ.get("MLFLOW_RUN_ID") if adopt_launcher else None,
    )
    status = "FAILED"
    try:
        log_dataset_inputs(client, run_id, [test_dataset(p)], "evaluation")
        metrics = evaluate_in_run(client, p, run_id)
        for evaluated in (p.what.get("vocoder_run"), p.asr_run):
            if evaluated:
                client.set_tag(evaluated, tag.EVALUATION_RUN, run_id)
        evaluated = evaluated_items(client, p)
        version = record_in_registry(client, p, metrics, run_id, evaluated)
        listening = ui_url(
            client.get_run(run_id).info.experiment_id,
            run_id,  # `mlflow run` may have chosen it
            page="artifactPath/listening/index.html",
        )
        client.set_tag(
            run_id,
            tag.NOTE,
            describe_evaluation(
                mode=p.mode,
                evaluated=evaluated,
                test_set=test_set_text(p),
                metrics=metrics,
                listening=listening,
                model_version=f"models:/{registry.MODEL_NAME}/{version}" if version else "",
            ),
        )
        status = "FINISHED"
    except Exception:
        log.exception("Evaluation failed")
        return EXIT_FAILED
    finally:
        client.set_terminated(run_id, status)
    print_summary(metrics, run_id, f"runs:/{run_id}/listening/index.html")
    return EXIT_OK


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
