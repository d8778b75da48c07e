"""Listening pages: audio examples with spectrograms and a small HTML page that plays them.

MLflow's artifact viewer shows an HTML artifact from a ``blob:`` URL in a sandboxed frame, where links
to the page's neighbours (``src='clip.wav'``) cannot resolve. So a page embeds its audio and images as
``data:`` URIs, up to ``EMBED_BUDGET`` bytes of media per page; media beyond the budget are linked by
name (they play when the page is downloaded with its folder). The files are written beside the page
either way.
"""

from __future__ import annotations

import base64
import hashlib
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from pipeline.common.files import contained

EMBED_BUDGET = 4 * 2**20  # media bytes a page embeds (base64 adds a third); about 20 s of 16 kHz 16-bit audio per MiB
MEDIA_TYPES = {".wav": "audio/wav", ".png": "image/png"}


class MediaEmbedder:
    """``src`` values for a page's media files: data URIs while the page's budget lasts, then file names."""

    def __init__(self, folder: Path, budget: int = EMBED_BUDGET):
        self.folder, self.left = folder, budget
        self.linked: list[str] = []  # files beyond the budget

    def src(self, name: str) -> str:
        data = (self.folder / name).read_bytes()
        if len(data) > self.left:
            self.linked.append(name)
            return html.escape(name)
        self.left -= len(data)
        kind = MEDIA_TYPES[Path(name).suffix.lower()]
        return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"

    def note(self) -> str:
        """A line for the page when something is linked rather than embedded."""
        if not self.linked:
            return ""
        return (
            f"<p><small>{len(self.linked)} media files are beyond this page's embedding budget and are linked by "
            "name: download the folder to play them.</small></p>"
        )


@dataclass
class Example:
    id: str
    text: str = ""
    audio: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)  # label -> mono waveform
    info: str = ""  # e.g. the degradation parameters
    images: list[str] = field(default_factory=list)  # extra images already in the page's folder
    rates: dict[str, int] = field(default_factory=dict)  # label -> sample rate, where not the page's


MAX_NAME = 96  # characters of an id kept in a file name (a file system allows 255 bytes with the suffixes)


def safe_name(text: str) -> str:
    """A file-name-safe version of an utterance ID (IDs may contain slashes or dots); a long one is cut and given
    a digest of the whole, so two ids stay two files."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
    return (
        safe if len(safe) <= MAX_NAME else f"{safe[: MAX_NAME - 17]}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    )


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
    media = MediaEmbedder(out_dir)
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
        f"<h2>{html.escape(title)}</h2>",
    ]
    for ex in examples:
        safe = safe_name(ex.id)
        waves = {
            label: (w.detach().cpu().float().numpy() if torch.is_tensor(w) else np.asarray(w, dtype=np.float32))
            for label, w in ex.audio.items()
        }
        rates = {label: ex.rates.get(label, sample_rate) for label in waves}
        players = []
        for label, wave in waves.items():
            name = f"{safe}_{label.replace(' ', '_')}.wav"
            sf.write(contained(str(out_dir), name), np.clip(wave, -1.0, 1.0), rates[label], subtype="PCM_16")
            players.append(f"{html.escape(label)} <audio controls preload='metadata' src='{media.src(name)}'></audio>")
        _spectrogram_png(Path(contained(str(out_dir), f"{safe}_spectrogram.png")), waves, rates, ex.id)
        parts.append(f"<h3>{html.escape(ex.id)}</h3>")
        if ex.text:
            parts.append(f"<p>{html.escape(ex.text)}</p>")
        if ex.info:
            parts.append(f"<p><small>{html.escape(ex.info)}</small></p>")
        parts.append("<p>" + " &nbsp; ".join(players) + "</p>")
        for image in [f"{safe}_spectrogram.png", *ex.images]:
            parts.append(f"<img src='{media.src(image)}'>")
    parts.append(media.note() + "</body></html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
