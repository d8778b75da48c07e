"""restore and the speech-restoration model: a trained tiny chain restores files, directories and requests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from helpers import CHAINS, demo_wave, snapshot
from mlflow import MlflowClient
from scipy.signal import resample_poly

from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.inference.chain import RestorationChain
from pipeline.inference.chain_checkpoints import chain_from_run
from pipeline.restore import run as restore


@pytest.mark.parametrize("chain", list(CHAINS), indirect=True)  # every kind of chain restores alike
def test_restore_a_file_tree_of_mixed_rates_and_channels_skipping_bad_files(chain, tmp_path, capfd):
    clean, rate = demo_wave()
    source = tmp_path / "noisy"
    (source / "sub" / "deeper").mkdir(parents=True)
    sf.write(source / "a.wav", clean, rate)
    stereo = np.stack([resample_poly(clean, 441, 160), 0.5 * resample_poly(clean, 441, 160)], axis=1)
    sf.write(source / "sub" / "stereo_44k.flac", stereo, 44100)
    sf.write(source / "sub" / "deeper" / "low_8k.ogg", resample_poly(clean, 1, 2), 8000)
    sf.write(source / "sub" / "silent.wav", np.zeros(8000, dtype=np.float32), 16000)
    (source / "sub" / "broken.wav").write_bytes(b"RIFF not really audio")
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    out = tmp_path / "restored"

    assert restore([f"run_id={chain['finetune']}", f"input={source}", f"output={out}"]) == EXIT_OK
    for name, channels, seconds in [
        ("a.wav", 1, len(clean) / rate),
        ("sub/stereo_44k.wav", 2, len(clean) / rate),
        ("sub/deeper/low_8k.wav", 1, len(clean) / rate),
    ]:
        info = sf.info(str(out / name))
        assert (info.samplerate, info.channels) == (16000, channels), name  # the tiny vocoder's rate
        assert info.duration == pytest.approx(seconds, abs=0.01), name
        restored, _ = sf.read(str(out / name))
        assert np.isfinite(restored).all() and np.abs(restored).max() > 0
    summary = {Path(r["input"]).name: r for r in _csv(out / "restore-summary.csv")}
    assert summary["silent.wav"]["status"] == "skipped" and summary["silent.wav"]["reason"].startswith("silent")
    assert summary["broken.wav"]["reason"].startswith("unreadable")
    assert not (out / "sub" / "silent.wav").exists() and not (out / "sub" / "broken.wav").exists()
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before  # inputs untouched

    (out / "a.wav").write_bytes(b"keep me")
    capfd.readouterr()
    assert restore([f"run_id={chain['finetune']}", f"input={source / 'a.wav'}", f"output={out}"]) == EXIT_OK
    assert (out / "a.wav").read_bytes() == b"keep me"
    assert "output exists (overwrite=true replaces it)" in capfd.readouterr().err
    assert (
        restore([f"run_id={chain['finetune']}", f"input={source / 'a.wav'}", f"output={out}", "overwrite=true"])
        == EXIT_OK
    )
    assert sf.info(str(out / "a.wav")).samplerate == 16000


def test_a_directory_where_no_file_is_usable_exits_2_with_the_reasons_counted(chain, tmp_path, capfd):
    source = tmp_path / "noisy"
    source.mkdir()
    (source / "broken.wav").write_bytes(b"RIFF not really audio")
    (source / "notes.flac").write_text("not audio")
    sf.write(source / "silent.wav", np.zeros(8000, dtype=np.float32), 16000)
    out = tmp_path / "restored"
    capfd.readouterr()
    assert restore([f"run_id={chain['finetune']}", f"input={source}", f"output={out}"]) == EXIT_BAD_INPUT
    errors = [line for line in capfd.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "none of the 3 audio files is usable (silent: 1, unreadable: 2; e.g. " in errors[0]
    assert str(out / "restore-summary.csv") in errors[0] and "Give audio files that soundfile reads" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["restore-summary.csv"]  # the reasons, no output


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_chunked_restoration_equals_whole_file_restoration_away_from_chunk_borders(chain, tmp_path):
    """Chunks of 2 s with 1 s of context and a 0.5 s cross-fade against the whole 17 s file at once: within
    1e-4 (the restored signal's RMS is about 0.05) everywhere, borders included, for the tiny chain."""
    source = chain_from_run(MlflowClient(), chain["finetune"], tmp_path / "w")
    waves = [torch.from_numpy(demo_wave(i)[0]) for i in range(6)]
    wave = torch.cat(waves)
    whole = RestorationChain.from_checkpoints(source.adapter_dir, source.vocoder_dir, chunk_seconds=0).restore(
        wave, 16000
    )
    chunked_chain = RestorationChain.from_checkpoints(
        source.adapter_dir, source.vocoder_dir, chunk_seconds=2.0, context_seconds=1.0, fade_seconds=0.5
    )
    chunked = chunked_chain.restore(wave, 16000)
    assert chunked.shape == whole.shape == wave.shape  # 16 kHz in, 16 kHz out
    assert len(range(0, -(-wave.numel() // chunked_chain.hop_in), chunked_chain.chunk_frames)) >= 8  # really chunked
    assert float((chunked - whole).abs().max()) < 1e-4
    assert float(whole.pow(2).mean().sqrt()) > 1e-3  # not a silent comparison


def test_bad_input_is_refused_with_one_message_and_nothing_written(chain, tmp_path, capfd):
    client = MlflowClient()
    empty = client.create_run(client.create_experiment("other"), tags={"stage": "finetune_vocoder"}).info.run_id
    clean, rate = demo_wave()
    source = tmp_path / "in"
    source.mkdir()
    sf.write(source / "a.wav", clean, rate)
    (tmp_path / "notes.wav").write_text("not audio")
    ok = [f"input={source}", f"output={tmp_path / 'out'}"]
    cases = [
        ([f"run_id={'0' * 32}", *ok], "not found in the tracking store"),
        ([f"run_id={chain['adapter']}", *ok], "is a train_adapter run, not a finetune_vocoder run"),
        (
            [f"run_id={chain['vocoder']}", *ok],
            "is a pretrain_vocoder run, not a finetune_vocoder run",
        ),  # only evaluate takes one
        ([f"run_id={empty}", *ok], "has no checkpoints to restore with"),
        (
            [f"run_id={chain['finetune']}", f"input={tmp_path / 'missing'}", f"output={tmp_path / 'out'}"],
            "input not found",
        ),
        ([f"run_id={chain['finetune']}", f"input={source}", f"output={source / 'restored'}"], "is inside input"),
        (
            [f"run_id={chain['finetune']}", f"input={tmp_path / 'notes.wav'}", f"output={tmp_path / 'out'}"],
            "cannot read audio file",
        ),
        ([f"run_id={chain['finetune']}", f"input={source / 'a.wav'}", f"output={source}"], "would overwrite it"),
        ([*ok], "Give exactly one of run_id"),
        ([f"run_id={chain['finetune']}", *ok, "chunk_secs=3"], "chunk_secs"),
        ([f"model_uri={tmp_path / 'nothing'}", *ok], "Model not found"),
    ]
    before = snapshot(client)
    for args, message in cases:
        capfd.readouterr()
        assert restore(args) == EXIT_BAD_INPUT, args
        assert message in capfd.readouterr().err, message
        assert not (tmp_path / "out").exists() and not (source / "restored").exists(), args
    assert snapshot(client) == before


@pytest.mark.parametrize("chain", list(CHAINS), indirect=True)  # every kind of chain restores alike
def test_the_model_reads_paths_only_when_its_config_allows_it_and_answers_one_channel(chain, tmp_path):
    """`path` is for local use, `mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})`; the model as
    logged (as `mlflow models serve` loads it) refuses it. A stereo file comes back as one channel (its mix),
    the shape an `audio` request gets; a FIFO is refused, not opened."""
    import mlflow
    from mlflow.exceptions import MlflowException

    clean, rate = demo_wave()
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([clean, 0.5 * clean], axis=1), rate, subtype="FLOAT")
    uri = f"runs:/{chain['finetune']}/model"
    with pytest.raises(MlflowException, match="does not read files on its machine"):
        mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"path": [str(stereo)]}))
    local = mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})
    by_path = local.predict(pd.DataFrame({"path": [str(stereo)]}))["audio"][0]
    by_samples = local.predict(pd.DataFrame({"audio": [(0.75 * clean).tolist()], "sample_rate": [rate]}))["audio"][0]
    assert np.asarray(by_path).shape == np.asarray(by_samples).shape == clean.shape
    np.testing.assert_allclose(by_path, by_samples, atol=1e-5)
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(MlflowException, match="must name a regular audio file"):
        local.predict(pd.DataFrame({"path": [str(fifo)]}))

    local.unwrap_python_model().chain = None  # a failure inside the model: a 500 with one line, no traceback
    with pytest.raises(MlflowException) as failed:
        local.predict(pd.DataFrame({"audio": [clean[:1600].tolist()], "sample_rate": [rate]}))
    assert failed.value.get_http_status_code() == 500
    assert json.loads(failed.value.serialize_as_json()) == {
        "error_code": "INTERNAL_ERROR",
        "message": "the model failed to restore this request; the server's log says why",
    }


def test_the_chain_is_a_logged_model_of_its_run_in_the_models_tab(chain):
    """finetune_vocoder's model/ (the whole restoration chain) is listed in its experiment's Models tab,
    pointing at the run's model/ with the metrics of its last step."""
    client = MlflowClient()
    run = client.get_run(chain["finetune"])
    (final,) = [
        m
        for m in client.search_logged_models([run.info.experiment_id], f"source_run_id = '{chain['finetune']}'")
        if m.model_type == "final-model"
    ]
    assert final.name == f"final-{run.info.run_name}" and final.status.name == "READY"
    assert final.tags["checkpoint.uri"] == f"runs:/{chain['finetune']}/model"
    assert {m.key: m.value for m in final.metrics}["train/mel"] == run.data.metrics["train/mel"]
