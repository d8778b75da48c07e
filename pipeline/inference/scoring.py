"""An evaluation's scores: each test file's audio in every condition it is scored in (``degraded``, ``restored``,
``copy_synthesis``; ``input`` and ``restored`` of a noisy recording; ``clean`` and ``degraded`` for a speech
recognizer), a row of metrics per file and condition (pipeline/inference/metrics.py, and CER/WER with a
recognizer), and their means (``summary``: ``eval/<condition>/<metric>``, ``eval/delta/<metric>``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from pipeline.config import DegradationConfig
from pipeline.data.audio import AudioError, audio_files, load_audio, read_channels
from pipeline.data.datasets import VAL_STREAM
from pipeline.data.degrade import degrade, sample_rng
from pipeline.inference import metrics as M
from pipeline.inference.evaluation import EvaluateConfig, Transcriber, preset, test_utterances
from pipeline.models.asr import error_counts

MODEL_FREE = ("clean", "degraded", "input")  # conditions that do not depend on the checkpoint: scored once


@dataclass
class Item:
    """One test file: its name, reference text and each condition's audio at 16 kHz."""

    name: str
    text: str
    audio: dict[str, np.ndarray]


def _to_16k(wave: torch.Tensor, rate: int) -> np.ndarray:
    return (AF.resample(wave, rate, M.RATE) if rate != M.RATE else wave).numpy()


def chain_items(chain, cfg: EvaluateConfig) -> list[Item]:
    degradation = preset("degradation", cfg.degradation, DegradationConfig)
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
    degradation = preset("degradation", cfg.degradation, DegradationConfig)
    items = []
    for index, utt in enumerate(test_utterances(cfg)):
        try:
            clean = load_audio(utt.path, M.RATE)
        except AudioError:
            continue  # counted and logged by check_usable
        noisy, _ = degrade(clean, M.RATE, degradation, sample_rng(cfg.seed, 0, index, VAL_STREAM))
        items.append(Item(Path(utt.id).name, utt.text, {"clean": clean.numpy(), "degraded": noisy.float().numpy()}))
    return items


def condition_items(mode: str, chain, cfg: EvaluateConfig) -> list[Item]:
    """The test set's files in the conditions ``mode`` scores (``chain``: the chain of the checkpoint scored)."""
    if mode == "asr":
        return asr_items(cfg)
    return noisy_items(chain, cfg) if mode == "noisy" else chain_items(chain, cfg)


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
