"""Listening pages: audio examples with spectrograms and a small HTML page that plays them."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


@dataclass
class Example:
    id: str
    text: str = ""
    audio: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)  # label -> mono waveform
    info: str = ""  # e.g. the degradation parameters
    images: list[str] = field(default_factory=list)  # extra images already in the page's folder
    rates: dict[str, int] = field(default_factory=dict)  # label -> sample rate, where not the page's


def safe_name(text: str) -> str:
    """A file-name-safe version of an utterance ID (IDs may contain slashes or dots)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _spectrogram_png(path: Path, waves: dict[str, np.ndarray], rates: dict[str, int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(waves), 1, figsize=(8, 2.2 * len(waves)), sharex=True, squeeze=False)
    for ax, (label, wave) in zip(axes[:, 0], waves.items()):
        with np.errstate(divide="ignore"):  # digital silence (e.g. a lost packet) is -inf dB
            ax.specgram(wave, NFFT=512, Fs=rates[label], noverlap=384, cmap="magma")
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("Hz")
    axes[-1, 0].set_xlabel("s")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_listening_page(out_dir: Path, title: str, examples: list[Example], sample_rate: int) -> Path:
    """``<id>_<label>.wav`` and ``<id>_spectrogram.png`` per example, and ``index.html``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h2>{html.escape(title)}</h2>"]
    for ex in examples:
        safe = safe_name(ex.id)
        waves = {label: (w.detach().cpu().float().numpy() if torch.is_tensor(w) else np.asarray(w, dtype=np.float32))
                 for label, w in ex.audio.items()}
        rates = {label: ex.rates.get(label, sample_rate) for label in waves}
        players = []
        for label, wave in waves.items():
            name = f"{safe}_{label.replace(' ', '_')}.wav"
            sf.write(out_dir / name, np.clip(wave, -1.0, 1.0), rates[label])
            players.append(f"{html.escape(label)} <audio controls src='{name}'></audio>")
        _spectrogram_png(out_dir / f"{safe}_spectrogram.png", waves, rates, ex.id)
        parts.append(f"<h3>{html.escape(ex.id)}</h3>")
        if ex.text:
            parts.append(f"<p>{html.escape(ex.text)}</p>")
        if ex.info:
            parts.append(f"<p><small>{html.escape(ex.info)}</small></p>")
        parts.append("<p>" + " &nbsp; ".join(players) + "</p>")
        for image in [f"{safe}_spectrogram.png", *ex.images]:
            parts.append(f"<img src='{html.escape(image)}'>")
    parts.append("</body></html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
