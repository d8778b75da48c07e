"""What an evaluation scores, decided before any run is written: its settings (``EvaluateConfig``, the
``evaluate`` command's words), its test set (the last ``test_size`` utterances of a corpus, degraded with a fixed
seed, or the recordings of ``noisy_dir``), the checkpoints and models it loads, and the key that decides reuse
(``Plan``, ``plan``). pipeline/inference/scoring.py scores the test set; pipeline/evaluate.py is the command.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.config import CONFIG_DIR, ConfigError, DataConfig
from pipeline.data.audio import AudioError, audio_files, read_channels
from pipeline.data.corpus import LoadReport, corpus_dataset, mlflow_dataset, read_corpus
from pipeline.engine import tags as tag
from pipeline.engine.checkpointing import list_checkpoints
from pipeline.engine.resume import RunCheckpoints
from pipeline.engine.stage import Precision
from pipeline.inference import metrics as M
from pipeline.inference.chain import load_chain, resolve_chain
from pipeline.inference.chain_checkpoints import CHAIN_STAGE, VOCODER_STAGE, stored_steps


@dataclass
class EvaluateConfig:
    """The ``evaluate`` command's settings (``key=value`` words: pipeline/evaluate.py, ``parse_args``)."""

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


def preset(group: str, name: str, schema: type):
    """configs/<group>/<name>.yaml over its schema; a ConfigError naming the choices when there is none."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.exists():
        choices = ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
        raise ConfigError(f"{group}={name!r}: no such preset; choose one of {choices}")
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))


def test_utterances(cfg: EvaluateConfig):
    data = preset("data", cfg.data, DataConfig)
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


def evaluation_key(what: dict[str, str], cfg: EvaluateConfig) -> str:
    settings = {
        k: v for k, v in asdict(cfg).items() if k not in ("run_id", "model_uri", "checkpoint", "device", "reuse")
    }
    return hashlib.sha256(json.dumps({**what, **settings}, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    data = preset("data", cfg.data, DataConfig)
    return corpus_dataset(f"{cfg.data}-test", cfg.data_root or data.root, test_utterances(cfg))
