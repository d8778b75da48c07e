"""Debian's English speech synthesisers as voices of the synthetic corpus (voices.py): flite's built-in voices,
festival's diphone voices and espeak-ng's accents and variants, each run as a subprocess with a timeout.

``synthesise`` speaks one sentence and returns 16 kHz mono float32 audio, silence trimmed and levelled. Speed and
pitch vary per utterance the same way for every synthesiser: the synthesiser stretches durations by
``pitch / speed``, and the result is then played back ``pitch`` times faster (resampled as if it had been recorded
at ``pitch`` times its rate), which raises pitch and formants by ``pitch`` and leaves the speaking rate at
``speed`` times the voice's own.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
TIMEOUT_S = 60.0  # one sentence takes well under a second on every synthesiser
TARGET_RMS = 0.1  # -20 dBFS
MAX_PEAK = 0.9  # well below full scale: no file is ever skipped as clipped
TRIM_DB = 40.0  # leading and trailing 10 ms frames this far below the loudest are cut
TRIM_MARGIN_S = 0.08  # silence kept at either end
RATE_STEP = 50  # the playback rate is rounded to this many Hz, so resampling uses a short polyphase filter

COMMANDS = {"flite": "flite", "festival": "text2wave", "espeak": "espeak-ng"}


class SynthesiserError(RuntimeError):
    """A synthesiser that is not installed or does not work; the message names the Debian package to install."""


@dataclass(frozen=True)
class Voice:
    name: str  # corpus speaker name: letters, digits and '-' only (the id of an utterance is '<name>-<number>')
    engine: str  # flite | festival | espeak
    voice: str  # the synthesiser's own name for it
    packages: str  # the Debian packages it needs, as apt-get takes them

    def command(self, text_file: Path, wav: Path, stretch: float) -> list[str]:
        """The command that speaks ``text_file`` into ``wav`` with durations stretched by ``stretch``."""
        if self.engine == "flite":
            stretch_arg = f"duration_stretch={stretch:.4f}"
            return ["flite", "-voice", self.voice, "--setf", stretch_arg, "-f", str(text_file), "-o", str(wav)]
        if self.engine == "festival":
            stretch_arg = f"(Parameter.set 'Duration_Stretch {stretch:.4f})"
            return ["text2wave", "-eval", f"({self.voice})", "-eval", stretch_arg, "-o", str(wav), str(text_file)]
        if self.engine == "espeak":  # words per minute; 175 is espeak-ng's default
            words_per_minute = min(max(round(175 / stretch), 80), 450)
            return ["espeak-ng", "-v", self.voice, "-s", str(words_per_minute), "-w", str(wav), "-f", str(text_file)]
        raise ValueError(f"unknown synthesiser {self.engine!r} for voice {self.name}")


def _flite(name: str) -> Voice:
    return Voice(f"flite-{name}", "flite", name, "flite")


def _espeak(voice: str) -> Voice:
    return Voice(f"espeak-{voice.replace('+', '-')}", "espeak", voice, "espeak-ng")


# espeak-ng accents with a variant each (+m1: male 1, +f2: female 2, ...). Plain "en" is British English: espeak-ng
# 1.51 ignores a variant after "en-gb" (en-gb+f4 sounds as en-gb).
ESPEAK_VOICES = (
    "en-us+m1 en-us+f2 en+m3 en+f4 en-gb-scotland+m2 en-gb-x-rp+f2 en-gb-x-gbclan+m4 en-gb-x-gbcwmd+f1 en-029+m5 "
    "en-us-nyc+f3"
).split()
VOICES: tuple[Voice, ...] = (
    *(_flite(name) for name in ("awb", "rms", "slt", "kal16", "kal")),  # kal is an 8 kHz voice
    Voice("festival-kal", "festival", "voice_kal_diphone", "festival festvox-kallpc16k"),
    Voice("festival-ked", "festival", "voice_ked_diphone", "festival festvox-kdlpc16k"),
    *(_espeak(voice) for voice in ESPEAK_VOICES),
)
VOICES_BY_NAME = {voice.name: voice for voice in VOICES}


def voices_named(names: tuple[str, ...] | list[str]) -> list[Voice]:
    unknown = [name for name in names if name not in VOICES_BY_NAME]
    if unknown:
        raise ValueError(f"unknown voices {unknown}; known: {sorted(VOICES_BY_NAME)}")
    return [VOICES_BY_NAME[name] for name in names]


def check_synthesisers(voices: list[Voice]) -> None:
    """Speak a word with each voice: SynthesiserError naming the packages to install when a synthesiser or a
    voice is missing, before a long build starts."""
    absent = [voice for voice in voices if shutil.which(COMMANDS[voice.engine]) is None]
    if absent:
        commands = sorted({COMMANDS[voice.engine] for voice in absent})
        packages = sorted({package for voice in absent for package in voice.packages.split()})
        raise SynthesiserError(
            f"{', '.join(commands)} not found on PATH: the voices corpus needs Debian's speech synthesisers "
            f"(as root: apt-get install {' '.join(packages)}; scripts/setup.sh installs them)"
        )
    _check_flite_voices([voice for voice in voices if voice.engine == "flite"])
    for voice in voices:
        synthesise(voice, "Hello.", 1.0, 1.0)


def _check_flite_voices(voices: list[Voice]) -> None:
    """flite speaks with its default voice when asked for one it lacks: compare with the voices it lists."""
    if not voices:
        return
    done = subprocess.run(["flite", "-lv"], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    listed = set(done.stdout.replace(":", " ").split())
    lacking = [voice.voice for voice in voices if voice.voice not in listed]
    if lacking:
        raise SynthesiserError(
            f"flite lacks the voices {lacking} (it lists: {done.stdout.strip()}); Debian's flite package has them "
            "(as root: apt-get install flite)"
        )


def synthesise(voice: Voice, text: str, speed: float, pitch: float) -> np.ndarray:
    """``text`` spoken by ``voice`` at ``speed`` times its speaking rate and ``pitch`` times its pitch: 16 kHz mono
    float32, leading and trailing silence trimmed, levelled to ``TARGET_RMS`` with its peak at most ``MAX_PEAK``."""
    with tempfile.TemporaryDirectory(prefix="voices-") as tmp:
        text_file, wav = Path(tmp) / "text.txt", Path(tmp) / "speech.wav"
        text_file.write_text(text + "\n", encoding="utf-8")
        command = voice.command(text_file, wav, pitch / speed)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as err:
            raise SynthesiserError(f"{voice.name}: {command[0]} took over {TIMEOUT_S:g} s for {text!r}") from err
        if done.returncode != 0 or not wav.is_file() or wav.stat().st_size <= 44:
            detail = (done.stderr or done.stdout).strip()[-500:].rstrip(".")
            raise SynthesiserError(
                f"{voice.name}: {' '.join(command[:3])} ... failed (exit {done.returncode}) for {text!r}: {detail}. "
                f"Is the voice installed? (as root: apt-get install {voice.packages})"
            )
        data, rate = sf.read(str(wav), dtype="float64", always_2d=True)
    wave = _play_faster(_trim(data.mean(axis=1), rate), rate, pitch)
    if float(np.sqrt(np.mean(wave**2))) < 1e-6:
        raise SynthesiserError(f"{voice.name}: {command[0]} wrote silence for {text!r}")
    return _level(wave)


def speak_to_file(job: tuple[str, str, float, float, str]) -> int:
    """Synthesise ``(voice name, text, speed, pitch, wav path)`` into that 16-bit wav; returns its sample count.
    The work of one synthesis process (voices.py)."""
    name, text, speed, pitch, path = job
    wave = synthesise(VOICES_BY_NAME[name], text, speed, pitch)
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return len(wave)


def _trim(wave: np.ndarray, rate: int) -> np.ndarray:
    frame = rate // 100
    frames = len(wave) // frame
    if frames == 0:
        return wave
    energy = np.sqrt(np.mean(wave[: frames * frame].reshape(frames, frame) ** 2, axis=1))
    loud = np.flatnonzero(energy > energy.max() * 10 ** (-TRIM_DB / 20))
    if loud.size == 0:
        return wave
    margin = int(TRIM_MARGIN_S * rate)
    return wave[max(loud[0] * frame - margin, 0) : min((loud[-1] + 1) * frame + margin, len(wave))]


def _play_faster(wave: np.ndarray, rate: int, pitch: float) -> np.ndarray:
    """``wave`` (at ``rate``) played ``pitch`` times faster, at ``SAMPLE_RATE``: it is read as if it had been recorded
    at ``pitch * rate`` (rounded to ``RATE_STEP`` Hz) and resampled from that rate."""
    played_at = max(round(rate * pitch / RATE_STEP), 1) * RATE_STEP
    common = gcd(SAMPLE_RATE, played_at)
    if common == played_at == SAMPLE_RATE:
        return wave
    return resample_poly(wave, SAMPLE_RATE // common, played_at // common)


def _level(wave: np.ndarray) -> np.ndarray:
    wave = wave * (TARGET_RMS / float(np.sqrt(np.mean(wave**2))))
    peak = float(np.abs(wave).max())
    if peak > MAX_PEAK:
        wave = wave * (MAX_PEAK / peak)
    return wave.astype(np.float32)


def synthesiser_versions(voices: list[Voice]) -> dict[str, str]:
    """The version of each synthesiser and voice package the voices use (Debian's package versions, where
    dpkg-query answers; else the synthesiser's own version line)."""
    versions = {}
    packages = sorted({package for voice in voices for package in voice.packages.split()})
    for package in packages:
        versions[package] = _package_version(package)
    return versions


def _package_version(package: str) -> str:
    """Debian's version of ``package``; else its synthesiser's ``--version`` line; else "unknown"."""
    commands = [["dpkg-query", "-W", "-f", "${Version}", package]] if shutil.which("dpkg-query") else []
    if package in ("flite", "festival", "espeak-ng"):
        commands.append([package, "--version"])
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if done.returncode == 0 and lines:
            return next((line for line in lines if "version" in line.lower()), lines[0])
    return "unknown"
