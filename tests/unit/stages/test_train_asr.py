"""train_asr and transcribe: the Conformer CTC stage end to end, and the engine features it needs
(epochs, corpus-level validation rates, LR continuity when a resume moves the horizon).

Jobs run in-process where nothing needs a process boundary (fast), and as real subprocesses
(`python -m`, `mlflow run`) where signals or MLflow's own run handling are under test.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import (
    DEMO_WAV,
    REPO,
    TINY_ASR,
    artifact_dir,
    copied_store,
    loss_history,
    snapshot,
    stage_runs,
)
from mlflow import MlflowClient

from pipeline.config import compose_config
from pipeline.data.audio import load_audio
from pipeline.data.corpus import DEMO_DIR, read_corpus, read_directory
from pipeline.data.datasets import collate_padded
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED
from pipeline.engine.session import TrainingHooks, run_stage
from pipeline.engine.stage import LRSchedule, lr_factor
from pipeline.models.asr import BLANK, CharVocabulary, ConformerCTC, error_counts, greedy_decode
from pipeline.stages.train_asr import TrainAsr, preset
from pipeline.transcribe import run as transcribe


def train(*args: str, hooks: TrainingHooks | None = None) -> int:
    return run_stage(TrainAsr, [*TINY_ASR, *args], hooks=hooks)


def asr_runs(client: MlflowClient):
    return stage_runs(client, "train_asr")


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return loss_history(client, run_id, key)


class StopAt(TrainingHooks):
    """Stops the job after the validation at ``step``, like the stop button would."""

    def __init__(self, step: int):
        self.step = step

    def on_validation(self, step: int, metrics: dict[str, float]) -> str | None:
        return "test" if step == self.step else None


FINISHED = ["trainer.epochs=3", "checkpoint.save_interval=2", "validation.interval=2"]


def train_finished_run() -> dict:
    assert train(*FINISHED) == EXIT_OK
    (run,) = asr_runs(MlflowClient())
    return {"run_id": run.info.run_id}


@pytest.fixture
def finished_run(store, tmp_path_factory):
    """A finished tiny run: 3 epochs of 2 steps, validated and checkpointed every 2 steps; trained once per test
    session, copied into each test's store."""
    return copied_store(tmp_path_factory, store, "asr-finished", [*TINY_ASR, *FINISHED], train_finished_run)["run_id"]


# --------------------------------------------------------------------------------------------
# Pure parts: LR schedule, text, decoding, error rates, batching, corpus readers, presets
# --------------------------------------------------------------------------------------------


def test_lr_factor_without_anchor_is_warmup_then_cosine():
    assert lr_factor(0, 4, 100, "cosine", 0.1) == pytest.approx(0.25)
    assert lr_factor(4, 4, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(52, 4, 100, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 4, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 0, 100, "constant", 0.1) == 1.0
    assert lr_factor(50, 0, 100, "constant", 0.1, anchor_step=30, anchor_factor=0.4) == 0.4  # holds a resumed LR


def test_anchored_lr_factor_continues_from_the_anchor_and_decays_to_the_floor():
    f30 = lr_factor(30, 4, 60, "cosine", 0.1)  # where a 60-step job is when it is resumed with 200
    anchored = [lr_factor(s, 4, 200, "cosine", 0.1, anchor_step=30, anchor_factor=f30) for s in range(30, 201)]
    assert anchored[0] == pytest.approx(f30)
    assert anchored[-1] == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in zip(anchored, anchored[1:]))  # monotone: no jump up
    assert abs(anchored[1] - anchored[0]) < abs(
        lr_factor(30, 4, 60, "cosine", 0.1) - lr_factor(29, 4, 60, "cosine", 0.1)
    )
    # an anchor inside the warm-up changes nothing
    assert lr_factor(50, 10, 100, "cosine", 0.1, anchor_step=3, anchor_factor=0.4) == lr_factor(
        50, 10, 100, "cosine", 0.1
    )


def test_lr_schedule_retargets_and_survives_a_weights_only_checkpoint(tmp_path):
    fn = LRSchedule(warmup_steps=2, total_steps=1000, schedule="cosine", min_ratio=0.1)
    assert fn.retarget(0, 20) is False and fn.total_steps == 20 and fn.anchor_step == 0  # fresh start
    before = fn(8)
    assert fn.retarget(8, 50) is True
    assert fn(8) == pytest.approx(before) and fn(50) == pytest.approx(0.1)
    sch = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), fn)
    torch.save(sch.state_dict(), tmp_path / "s.pt")
    other = LRSchedule(2, 20, "cosine", 0.1)
    sch2 = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), other)
    sch2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (other.total_steps, other.anchor_step, other.anchor_factor) == (50, 8, pytest.approx(before))


def test_vocabulary_normalises_and_round_trips():
    vocab = CharVocabulary(" 'abcdefghijklmnopqrstuvwxyz")
    assert vocab.normalize("Café, it's  2 A.M.!") == "cafe it's a m"
    assert vocab.decode(vocab.encode("Hello, World")) == "hello world"
    assert len(vocab) == 29 and BLANK not in vocab.encode("abc")
    with pytest.raises(ValueError, match="without repeats"):
        CharVocabulary("aa")


def test_greedy_decode_merges_repeats_and_drops_blanks():
    vocab = CharVocabulary("ab ")
    frames = [1, 1, 0, 1, 2, 2, 0, 0, 3, 1]  # a a _ a b b _ _ ' ' a
    log_probs = torch.full((1, len(frames), 4), -10.0)
    log_probs[0, torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    assert greedy_decode(log_probs, torch.tensor([len(frames)]), vocab) == ["aab a"]
    assert greedy_decode(log_probs, torch.tensor([3]), vocab) == ["a"]  # padding frames are ignored


def test_error_counts_sum_edits_and_reference_lengths():
    counts = error_counts(["the cat", "a dog"], ["the cat sat", "a dog"])
    assert counts == {"cer": (4, 16), "wer": (1, 5)}
    # corpus CER is 4/16 = 0.25, not the mean of per-utterance rates (4/11 + 0) / 2 = 0.18
    assert counts["cer"][0] / counts["cer"][1] == 0.25


def test_collate_pads_audio_and_targets_and_keeps_lengths():
    items = [
        {"audio": torch.ones(5), "targets": torch.tensor([1, 2]), "index": torch.tensor(0)},
        {"audio": torch.ones(3), "targets": torch.tensor([3, 4, 5]), "index": torch.tensor(1)},
    ]
    batch = collate_padded(items)
    assert batch["audio"].shape == (2, 5) and batch["audio"][1, 3:].abs().sum() == 0
    assert batch["audio_lengths"].tolist() == [5, 3] and batch["target_lengths"].tolist() == [2, 3]
    assert batch["targets"].tolist() == [[1, 2, 0], [3, 4, 5]]


def test_model_output_frames_match_its_forward():
    model = ConformerCTC(preset("tiny")).eval()
    lengths = torch.tensor([16000, 12345, 4000])
    log_probs, frames = model(torch.randn(3, 16000), lengths)
    assert frames.tolist() == [model.output_frames(int(n)) for n in lengths]
    assert log_probs.shape == (3, int(frames.max()), 29)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-4)


def test_directory_reader_finds_audio_and_transcripts(tmp_path):
    wave = np.sin(np.linspace(0, 300, 8000)).astype(np.float32)
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "a.wav", wave, 16000)
    sf.write(tmp_path / "sub" / "b.flac", wave, 16000)
    (tmp_path / "a.txt").write_text("Hello there\n")
    (tmp_path / "notes.md").write_text("not audio")
    utterances = read_directory(tmp_path)
    assert [(u.id, u.text) for u in utterances] == [("a", "Hello there"), ("sub/b", "")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        read_directory(tmp_path / "empty")


@pytest.mark.parametrize("name", ["tiny", "small", "medium"])
def test_asr_presets_compose(name):
    cfg = compose_config("train_asr", [f"asr={name}"])
    assert cfg.asr.name == name and cfg.trainer.epochs > 0 and cfg.asr.conv_kernel % 2 == 1


def test_light_mode_means_the_tiny_preset_and_short_utterances():
    cfg = TrainAsr.resolve_config(compose_config("train_asr", ["asr=medium", "light=true"]))
    assert cfg.asr.name == "tiny" and cfg.asr.dim == preset("tiny").dim
    for data in ("ljspeech", "directory"):
        assert compose_config("train_asr", [f"data={data}", "data.root=/x"]).data.format in ("ljspeech", "directory")


# --------------------------------------------------------------------------------------------
# Training as the dashboard shows it
# --------------------------------------------------------------------------------------------


def test_tiny_conformer_overfits_a_handful_of_utterances(store):
    """Measured on 2 CPU cores: training CER 0.98 over the first 5 steps -> 0.01 over the last 5
    (80 steps, lr 3e-3, about 10-20 s). The assertion leaves a wide margin."""
    assert (
        train(
            "max_samples=4",
            "trainer.epochs=80",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            "validation.interval=0",
            "checkpoint.save_interval=1000",
            "trainer.log_interval=20",
        )
        == EXIT_OK
    )
    client = MlflowClient()
    (run,) = asr_runs(client)
    cer = [v for _, v in history(client, run.info.run_id, "train/cer")]
    assert len(cer) == 80
    start, end = sum(cer[:5]) / 5, sum(cer[-5:]) / 5
    assert start > 0.8
    assert end < 0.3 and end < start - 0.5, (start, end)

    # The finished run's model/ (an MLflow pyfunc) transcribes what it learnt, from files and from arrays.
    import pandas as pd

    assert not (artifact_dir(client, run.info.run_id) / "model" / "python_model.pkl").exists()  # code, not pickle
    utterances = read_corpus("ljspeech", None)[:4]  # the training set: max_samples=4 of the corpus
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model", model_config={"allow_paths": True})
    texts = model.predict(pd.DataFrame({"path": [str(u.path) for u in utterances]}))["transcript"].tolist()
    vocab = CharVocabulary(preset("tiny").vocabulary)
    edits, chars = error_counts(texts, [vocab.normalize(u.text) for u in utterances])["cer"]
    assert edits / chars < 0.3, texts
    arrays = [load_audio(u.path, 16000).numpy() for u in utterances]
    assert model.predict(pd.DataFrame({"audio": arrays}))["transcript"].tolist() == texts


def test_run_is_tagged_charted_and_listed_by_model_and_dataset(finished_run, capsys):
    client = MlflowClient()
    run = client.get_run(finished_run)
    tags = run.data.tags
    assert (tags["stage"], tags["model"], tags["dataset"], tags["model.preset"]) == (
        "train_asr",
        "conformer",
        "demo",
        "tiny",
    )
    assert tags["progress"] == "Epoch 3/3 · Step 2/2"
    assert tags["checkpoint.latest_step"] == "6"
    for key in ("train/loss", "train/cer", "lr", "grad_norm", "epoch"):
        assert [s for s, _ in history(client, finished_run, key)] == list(range(1, 7)), key
    for key in ("val/loss", "val/cer", "val/wer"):
        assert [s for s, _ in history(client, finished_run, key)] == [2, 4, 6], key
    assert all(v >= 0 for _, v in history(client, finished_run, "val/cer"))
    # MLflow search, as typed in the UI
    found = client.search_runs([run.info.experiment_id], "tags.model = 'conformer' and tags.dataset = 'demo'")
    assert [r.info.run_id for r in found] == [finished_run]
    assert not client.search_runs([run.info.experiment_id], "tags.model = 'conformer' and tags.dataset = 'ljspeech'")
    # the checkpoint table, filtered the same way
    from pipeline.checkpoint_table import main as table_main

    assert table_main(["--model", "conformer", "--dataset", "demo", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["model"], r["dataset"], r["epoch"]) for r in rows][:2] == [
        ("step-00000006", "conformer", "demo", 3.0),
        ("step-00000004", "conformer", "demo", 2.0),
    ]
    assert all(r["size"] > 0 and r["created"] and "val/cer" in r for r in rows)
    assert table_main(["--model", "conformer", "--dataset", "ljspeech"]) == 0
    assert "no checkpoints found" in capsys.readouterr().out
    # the Models tab: the kept checkpoints and the final model/ as logged models of the run, by val/cer
    models = client.search_logged_models(
        [run.info.experiment_id],
        f"source_run_id = '{finished_run}'",
        order_by=[{"field_name": "metrics.val/cer", "ascending": True}],
    )
    steps = {m.model_type: [] for m in models}
    for m in models:
        steps[m.model_type].append(m.tags["checkpoint.step"])
    assert sorted(steps["checkpoint"]) == sorted(str(int(r["name"].split("-")[1])) for r in rows)
    (final,) = [m for m in models if m.model_type == "final-model"]
    assert final.tags["checkpoint.uri"] == f"runs:/{finished_run}/model" and final.status.name == "READY"
    assert final.name == f"final-{run.info.run_name}" and final.params["dataset"] == "demo"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["demo"]  # the runs table's Dataset column
    assert {m.key: m.value for m in final.metrics}["val/cer"] == history(client, finished_run, "val/cer")[-1][1]
    samples = artifact_dir(client, finished_run) / "samples" / "step-00000006"
    page = (samples / "index.html").read_text(encoding="utf-8")
    assert "greedy CTC transcript" in page and list(samples.glob("*.wav"))
    assert "<meta charset='utf-8'>" in page and "src='data:audio/wav;base64," in page  # plays inside MLflow's viewer


def test_validation_rates_are_computed_over_the_whole_set(store):
    """val/cer from the engine equals total edits / total reference characters of all batches."""
    assert (
        train(
            "trainer.epochs=1", "validation.interval=2", "checkpoint.save_interval=2", "batch_size=3", "max_samples=6"
        )
        == EXIT_OK
    )
    client = MlflowClient()
    (run,) = asr_runs(client)
    from pipeline.engine.checkpoint_files import load_state
    from pipeline.engine.checkpointing import download_checkpoint
    from pipeline.inference.asr import load_model

    ckpt = download_checkpoint(client, run.info.run_id, 2, store / "ckpt")
    model, vocab, _ = load_model(ckpt, torch.device("cpu"))
    assert load_state(ckpt)["step"] == 2
    from pipeline.data.audio import load_audio
    from pipeline.data.corpus import read_corpus

    val = read_corpus("ljspeech", None)[-4:]
    hyps = []
    with torch.no_grad():
        for utt in val:  # one at a time: no padding, so the per-utterance outputs are exact
            wave = load_audio(utt.path, 16000)
            log_probs, frames = model(wave[None], torch.tensor([wave.numel()]))
            hyps += greedy_decode(log_probs, frames, vocab)
    counts = error_counts(hyps, [vocab.normalize(u.text) for u in val])
    (logged,) = [v for s, v in history(client, run.info.run_id, "val/cer") if s == 2]
    assert logged == pytest.approx(counts["cer"][0] / counts["cer"][1], abs=0.02)


def test_stop_and_resume_across_an_epoch_boundary_is_bit_identical(store):
    steps = ["trainer.epochs=4", "validation.interval=3", "checkpoint.save_interval=100"]
    assert train(*steps, "tracking.run_name=reference") == EXIT_OK
    assert train(*steps, "tracking.run_name=stopped", hooks=StopAt(3)) == EXIT_STOPPED  # mid-epoch 2
    client = MlflowClient()
    reference, stopped = asr_runs(client)
    assert client.get_run(stopped.info.run_id).data.tags["checkpoint.latest_step"] == "3"
    assert train(f"resume_run={stopped.info.run_id}") == EXIT_OK
    expected = history(client, reference.info.run_id, "train/loss")
    got = history(client, stopped.info.run_id, "train/loss")
    assert [s for s, _ in got] == list(range(1, 9))
    assert got == expected  # bit-identical at every step, dropout included
    assert history(client, stopped.info.run_id, "lr") == history(client, reference.info.run_id, "lr")
    tags = client.get_run(stopped.info.run_id).data.tags
    assert tags["resume.from"] == "epoch 1.5" and tags["progress"] == "Epoch 4/4 · Step 2/2 · resumed from epoch 1.5"


def test_resume_with_more_epochs_and_another_batch_size_keeps_the_lr_curve(store, capfd):
    base_lr, min_ratio = 1e-3, 0.05
    common = [f"optim.lr={base_lr}", f"optim.min_lr_ratio={min_ratio}", "checkpoint.save_interval=100"]
    assert train(*common, "trainer.epochs=4", "validation.interval=4", hooks=StopAt(4)) == EXIT_STOPPED
    client = MlflowClient()
    (run,) = asr_runs(client)
    run_id = run.info.run_id
    assert client.get_run(run_id).data.tags["progress"] == "Epoch 2/4 · Step 2/2"
    capfd.readouterr()

    assert (
        train(*common, f"resume_run={run_id}", "trainer.epochs=6", "batch_size=2", "validation.interval=0") == EXIT_OK
    )
    err = capfd.readouterr().err
    assert "Configuration changes detected:\n  - batch_size: 4 -> 2\n  - trainer.epochs: 4 -> 6" in err
    assert "continuing from lr=" in err
    tags = client.get_run(run_id).data.tags
    assert tags["resume.from"] == "epoch 2" and tags["resume.count"] == "1"
    assert tags["progress"] == "Epoch 6/6 · Step 4/4 · resumed from epoch 2"  # 4 batches of 2 per epoch now
    attempt = (artifact_dir(client, run_id) / "config" / "attempt-2.yaml").read_text()
    assert "batch_size:\n    old: 4\n    new: 2" in attempt and "trainer.epochs:\n    old: 4\n    new: 6" in attempt

    lrs = dict(history(client, run_id, "lr"))
    assert sorted(lrs) == list(range(1, 21))  # 4 steps + 4 more epochs of 4 batches
    # one curve: steps 1-4 on the 8-step plan, then a decay from the restored value over 16 new steps
    f4 = lr_factor(4, 2, 8, "cosine", min_ratio)
    for step in range(1, 21):
        factor = (
            lr_factor(step, 2, 8, "cosine", min_ratio)
            if step <= 4
            else lr_factor(step, 2, 20, "cosine", min_ratio, anchor_step=4, anchor_factor=f4)
        )
        assert lrs[step] == pytest.approx(base_lr * factor, rel=1e-6), step
    values = [lrs[s] for s in range(1, 21)]
    assert all(b <= a for a, b in zip(values, values[1:]))  # no jump up anywhere
    assert lrs[4] - lrs[5] < lrs[3] - lrs[4]  # the resume step is no steeper than the curve before it
    assert values[-1] == pytest.approx(base_lr * min_ratio)


def test_light_mode_and_a_sample_limit_may_change_on_resume(finished_run, capfd):
    capfd.readouterr()
    assert train(f"resume_run={finished_run}", "light=true", "max_samples=4", "trainer.epochs=5") == EXIT_OK
    err = capfd.readouterr().err
    assert "  - light: False -> True\n  - max_samples: 8 -> 4\n  - trainer.epochs: 3 -> 5" in err
    assert "longer than 2.5 s" in err  # light mode dropped the long utterances
    tags = MlflowClient().get_run(finished_run).data.tags
    assert tags["progress"] == "Epoch 5/5 · Step 1/1 · resumed from epoch 3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["asr.dim=32"], "Refusing to resume: these overrides change the model architecture"),
        ([], "Nothing to train: the checkpoint is at epoch 3 and trainer.epochs=3"),
        (["max_samples=0", "trainer.epochs=4"], "max_samples=0 must be at least 1"),
        (["trainer.epoch=4"], "epoch"),
    ],
)
def test_bad_resumes_are_refused_before_anything_is_written(finished_run, capfd, args, message):
    client = MlflowClient()
    before = snapshot(client)
    capfd.readouterr()
    assert train(f"resume_run={finished_run}", *args) == EXIT_BAD_INPUT
    assert message in capfd.readouterr().err
    assert snapshot(client) == before


# --------------------------------------------------------------------------------------------
# transcribe
# --------------------------------------------------------------------------------------------


def test_transcribe_a_file_and_a_directory_with_latest_best_and_registered(finished_run, capsys, tmp_path):
    client = MlflowClient()
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("DEMO-0001", "DEMO-0002"):
        (clips / f"{name}.wav").write_bytes((DEMO_DIR / "wavs" / f"{name}.wav").read_bytes())
    out = tmp_path / "out" / "t.csv"
    assert transcribe([f"run_id={finished_run}", f"input={clips}", f"output={out}", "model_uri="]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(clips / "DEMO-0001.wav"), str(clips / "DEMO-0002.wav")]
    assert out.read_text().splitlines()[0] == "file,transcript"
    logged = list((artifact_dir(client, finished_run) / "transcriptions").glob("*.json"))
    assert len(logged) == 1 and "DEMO-0002.wav" in logged[0].read_text()

    assert transcribe([f"run_id={finished_run}", f"input={DEMO_WAV}", "checkpoint=best"]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"{DEMO_WAV}\t")

    source = f"{client.get_run(finished_run).info.artifact_uri}/checkpoints/step-00000006"
    client.create_registered_model("asr-demo")
    client.create_model_version("asr-demo", source, run_id=finished_run)
    assert transcribe(["model_uri=models:/asr-demo/1", f"input={DEMO_WAV}"]) == EXIT_OK
    registered = capsys.readouterr().out
    assert transcribe([f"run_id={finished_run}", f"input={DEMO_WAV}"]) == EXIT_OK
    assert capsys.readouterr().out == registered  # the same checkpoint gives the same transcript

    # The run's final MLflow model (model/), by run URI or registered, holds the same weights.
    version = mlflow.register_model(f"runs:/{finished_run}/model", "asr-final")
    for uri in (f"runs:/{finished_run}/model", f"models:/asr-final/{version.version}"):
        assert transcribe([f"model_uri={uri}", f"input={DEMO_WAV}"]) == EXIT_OK
        assert capsys.readouterr().out == registered


def test_transcribe_bad_input_gives_one_clear_error_and_writes_nothing(finished_run, capfd, tmp_path):
    client = MlflowClient()
    experiment = client.get_run(finished_run).info.experiment_id
    untrained = client.create_run(experiment, tags={"stage": "train_asr"}).info.run_id
    client.set_terminated(untrained, "FAILED")
    adapter = client.create_run(experiment, tags={"stage": "train_adapter"}).info.run_id
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is text, not audio")
    before = snapshot(client)
    for args, message in [
        (
            ["run_id=0123456789abcdef0123456789abcdef", f"input={DEMO_WAV}"],
            "Run 0123456789abcdef0123456789abcdef not found",
        ),
        ([f"run_id={untrained}", f"input={DEMO_WAV}"], f"Run {untrained} has no checkpoints to transcribe with"),
        ([f"run_id={adapter}", f"input={DEMO_WAV}"], "is a train_adapter run, not a train_asr run"),
        ([f"run_id={finished_run}", f"input={not_audio}"], f"cannot read audio file {not_audio}"),
        ([f"run_id={finished_run}", f"input={tmp_path / 'missing.wav'}"], "input not found"),
        ([f"run_id={finished_run}", f"input={DEMO_WAV}", "inptu=x"], "Key 'inptu' not in"),
        ([f"input={DEMO_WAV}"], "Give exactly one of run_id"),
        (["model_uri=models:/nope/1", f"input={DEMO_WAV}"], "Model not found: models:/nope/1"),
    ]:
        capfd.readouterr()
        assert transcribe(args) == EXIT_BAD_INPUT, args
        captured = capfd.readouterr()
        errors = [line for line in captured.err.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and message in errors[0], captured.err[-2000:]
        assert captured.out == ""
    assert snapshot(client) == before


def test_the_asr_model_reads_only_the_request_unless_its_config_allows_paths(finished_run, monkeypatch):
    """The run's model/ as `mlflow models serve` loads it (the saved config): a path on the server is refused
    before it is looked at; audio comes as float samples with their rate or as WAV/FLAC bytes (base64) and is
    resampled to the model's rate; a bad rate or length gets one 400 message, a failure inside one 500 line,
    neither with a traceback or the request. `path` is for local use with model_config allow_paths."""
    import base64
    import io

    import pandas as pd
    from mlflow.exceptions import MlflowException

    uri = f"runs:/{finished_run}/model"
    served = mlflow.pyfunc.load_model(uri)
    for request in (pd.DataFrame({"path": [str(DEMO_WAV)]}), str(DEMO_WAV), [str(DEMO_WAV)]):
        with pytest.raises(MlflowException) as refused:
            served.predict(request)
        assert refused.value.get_http_status_code() == 400
        assert "does not read files on its machine" in refused.value.message
        assert str(DEMO_WAV) not in refused.value.serialize_as_json()

    wave, rate = sf.read(str(DEMO_WAV), dtype="float32")
    local = mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})
    expected = local.predict(pd.DataFrame({"path": [str(DEMO_WAV)]}))["transcript"].tolist()
    by_samples = served.predict(pd.DataFrame({"audio": [wave.tolist()], "sample_rate": [rate]}))
    assert by_samples["transcript"].tolist() == expected

    def encoded(file_format: str, subtype: str) -> str:
        buffer = io.BytesIO()
        sf.write(buffer, np.stack([wave, wave], axis=1), rate, format=file_format, subtype=subtype)
        return base64.b64encode(buffer.getvalue()).decode()

    seen = []  # what reaches the recogniser: one channel at the model's rate
    monkeypatch.setattr(
        "pipeline.inference.asr.transcribe",
        lambda model, vocab, waves, device: [seen.append(w.numpy()) or "" for w in waves],
    )
    for request in (
        {"audio": [wave.tolist()], "sample_rate": [rate]},
        {"audio": [wave]},  # no sample_rate: 16 kHz
        {"audio_base64": [encoded("WAV", "FLOAT")]},
        {"audio_base64": [encoded("FLAC", "PCM_24")]},
    ):
        assert served.predict(pd.DataFrame(request))["transcript"].tolist() == [""], request.keys()
        np.testing.assert_allclose(seen.pop(), wave, atol=1e-6)
    served.predict(pd.DataFrame({"audio": [[0.1] * 44100, [0.1] * 8000], "sample_rate": [44100, 8000]}))
    assert [len(w) for w in seen] == [16000, 16000]
    monkeypatch.undo()

    for request, message in [
        ({"audio": [[0.1] * 100], "sample_rate": [1e308]}, "from 8000 to 192000"),
        ({"audio": [[0.1] * 100], "sample_rate": [16000.5]}, "whole number"),
        ({"audio": [[0.1] * 100], "sample_rate": [4000]}, "from 8000 to 192000"),
        ({"audio": [[0.1] * (8000 * 61)], "sample_rate": [8000]}, "transcribe long files with pipeline.transcribe"),
        ({"audio_base64": ["%%%"]}, "not valid base64"),
        ({"something": [1]}, "give exactly one of audio_base64"),
        ({"audio": [[0.1] * 100], "sample_rate": [16000]}, "send at least 0.1 s"),
    ]:
        with pytest.raises(MlflowException) as refused:
            served.predict(pd.DataFrame(request))
        answer = json.loads(refused.value.serialize_as_json())
        assert refused.value.get_http_status_code() == 400 and message in answer["message"], answer
        assert set(answer) == {"error_code", "message"} and "Traceback" not in answer["message"]

    local.unwrap_python_model().model = None  # a failure inside the model: a 500 with one line
    with pytest.raises(MlflowException) as failed:
        local.predict(pd.DataFrame({"audio": [wave.tolist()], "sample_rate": [rate]}))
    assert failed.value.get_http_status_code() == 500
    assert json.loads(failed.value.serialize_as_json()) == {
        "error_code": "INTERNAL_ERROR",
        "message": "the model failed to transcribe this request; the server's log says why",
    }


# --------------------------------------------------------------------------------------------
# Real processes: SIGTERM and `mlflow run`
# --------------------------------------------------------------------------------------------


def test_mlproject_has_the_asr_entry_points():
    import yaml

    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    assert set(spec["train_asr"]["parameters"]) == {"overrides", "resume_run", "resume_step", "nproc", "torchrun"}
    assert " train_asr resume_run={resume_run} " in spec["train_asr"]["command"]
    assert {"run_id", "model_uri", "input", "output"} <= set(spec["transcribe"]["parameters"])
    assert spec["transcribe"]["command"].startswith("python -m pipeline.transcribe ")
