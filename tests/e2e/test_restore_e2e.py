"""The chain's MLflow model served by `mlflow models serve`: requests refused or answered, memory bounded."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
from helpers import REPO, VENV_BIN, demo_wave, env_for, free_port, http_status, peak_rss, post_json, wait_for
from scipy.signal import resample_poly

from pipeline.inference.requests import MAX_SECONDS

pytestmark = pytest.mark.slow


def test_served_chain_restores_requests_and_answers_bad_ones_with_400(chain, tmp_path):
    """The run's model/ registered as speech-restoration, served by a real `mlflow models serve`: float
    samples and WAV/FLAC bytes are restored, a path on the server is refused without being opened, a bad
    request gets a 4xx with one short message that names no server path and holds no traceback, an odd
    sample rate is resampled in bounded memory; and the restore entry point through `mlflow run`."""
    import mlflow

    version = mlflow.register_model(f"runs:/{chain['finetune']}/model", "speech-restoration").version
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(VENV_BIN) / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/speech-restoration/{version}",
            "--env-manager",
            "local",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env_for(chain["dir"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/ping") == 200, timeout=120, what="the model server")
        url = f"http://127.0.0.1:{port}/invocations"
        clean, _ = demo_wave()
        stereo_44k = np.stack([resample_poly(clean[:8000], 441, 160)] * 2, axis=1)
        status, body = post_json(
            url,
            {
                "dataframe_records": [
                    {"audio": clean[:8000].tolist(), "sample_rate": 16000},
                    {"audio": clean[:4000:2].tolist(), "sample_rate": 8000},
                    {"audio_base64": _encoded(stereo_44k, 44100, "WAV")},
                    {"audio_base64": _encoded(clean[:8000], 16000, "FLAC")},
                ]
            },
        )
        assert status == 200, body
        rows = body["predictions"]
        assert [len(r["audio"]) for r in rows] == [8000, 4000, 8000, 8000] and {r["sample_rate"] for r in rows} == {
            16000
        }
        assert all(np.isfinite(r["audio"]).all() for r in rows)
        assert np.corrcoef(rows[0]["audio"], rows[3]["audio"])[0, 1] > 0.99  # the FLAC is the same audio

        worker = _model_process(server)
        peak = peak_rss(worker)
        status, body = post_json(url, {"dataframe_records": [{"audio": clean[:16001].tolist(), "sample_rate": 16001}]})
        assert status == 200 and len(body["predictions"][0]["audio"]) == 16000, str(body)[:300]
        assert peak_rss(worker) < peak + 2**29  # a bounded filter; torchaudio's 16001 -> 16000 Hz kernel is 4.8 GiB

        recording = tmp_path / "private.wav"  # a recording beside the server
        sf.write(recording, clean, 16000)
        fifo = tmp_path / "pipe.wav"  # opening it for reading would block until someone writes
        os.mkfifo(fifo)
        hidden = [str(tmp_path), str(REPO), sys.prefix, "site-packages", "Traceback", "Failed to predict data"]
        bad = [
            ({"dataframe_records": [{"path": str(recording)}]}, "does not read files"),
            ({"dataframe_records": [{"path": str(fifo)}]}, "does not read files"),
            ({"dataframe_records": [{"path": str(tmp_path / "missing.wav")}]}, "does not read files"),
            ({"dataframe_records": [{"audio": [], "sample_rate": 16000}]}, "audio is empty"),
            ('{"dataframe_records": [{"audio": [NaN, 0.1], "sample_rate": 16000}]}', "NaN"),
            ({"dataframe_records": [{"audio": "hello", "sample_rate": 16000}]}, "audio must be a list"),
            ({"dataframe_records": [{"audio": [0.1] * 100, "sample_rate": 16000.5}]}, "whole number"),
            ({"dataframe_records": [{"audio": [0.1] * 100, "sample_rate": "fast"}]}, "sample_rate"),
            ({"dataframe_records": [{"audio": [0.1] * 300, "sample_rate": 1}]}, "from 8000 to 192000"),
            ({"dataframe_records": [{"audio": [0.1] * 100, "sample_rate": 1e308}]}, "from 8000 to 192000"),
            ({"dataframe_records": [{"audio": [0.1] * 100, "sample_rate": 192001}]}, "from 8000 to 192000"),
            (
                {"dataframe_records": [{"audio": [0.1] * int(16000 * (MAX_SECONDS + 1)), "sample_rate": 16000}]},
                "longer than",
            ),
            ({"dataframe_records": [{"audio_base64": _encoded(clean[:4000], 4000, "WAV")}]}, "from 8000 to 192000"),
            ({"dataframe_records": [{"audio_base64": _encoded(np.zeros((800, 3)), 16000, "WAV")}]}, "3 channels"),
            ({"dataframe_records": [{"audio_base64": _encoded(clean[:8000], 16000, "OGG")}]}, "not a WAV or FLAC"),
            ({"dataframe_records": [{"audio_base64": base64.b64encode(b"RIFF not audio").decode()}]}, "not a readable"),
            ({"dataframe_records": [{"audio_base64": "%%%"}]}, "not valid base64"),
            ({"dataframe_records": [{"something": 1}]}, "audio_base64"),
            ("not json", "JSON"),
        ]
        for request, message in bad:
            status, body = post_json(url, request, timeout=60)
            text = json.dumps(body)
            assert 400 <= status < 500 and message in text, (status, text[:300])
            assert not any(word in text for word in hidden), text[:300]
        with pytest.raises(OSError) as no_reader:  # nobody has the FIFO open: the server never opened it
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        assert no_reader.value.errno == errno.ENXIO
        status, body = post_json(url, {"dataframe_records": [{"audio": clean[:1600].tolist(), "sample_rate": 16000}]})
        assert status == 200 and len(body["predictions"][0]["audio"]) == 1600  # still serving
    finally:
        server.terminate()
        server.wait(timeout=30)

    clean, rate = demo_wave()
    sf.write(tmp_path / "clip.wav", clean, rate)
    done = subprocess.run(
        [
            str(Path(VENV_BIN) / "mlflow"),
            "run",
            str(REPO),
            "-e",
            "restore",
            "--env-manager",
            "local",
            "-P",
            f"model_uri=models:/speech-restoration/{version}",
            "-P",
            f"input={tmp_path / 'clip.wav'}",
            "-P",
            f"output={tmp_path / 'restored'}",
        ],
        cwd=tmp_path,
        env=env_for(chain["dir"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sf.info(str(tmp_path / "restored" / "clip.wav")).duration == pytest.approx(len(clean) / rate, abs=0.01)


def _encoded(wave: np.ndarray, rate: int, file_format: str) -> str:
    """An audio file's bytes, base64-encoded: what a request's audio_base64 carries."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=file_format)
    return base64.b64encode(buffer.getvalue()).decode()


def _model_process(server: subprocess.Popen) -> int:
    """The process of `mlflow models serve` that holds the model (its uvicorn child)."""
    [worker] = [p for p in psutil.Process(server.pid).children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    return worker.pid
