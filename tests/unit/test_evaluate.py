"""evaluate: a tiny chain scored on the demo test split in three conditions, an ASR run's CER/WER, reuse."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import CHAINS, REPO, VENV_BIN, artifact_dir, env_for, snapshot, stage_runs
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.evaluate import run as evaluate
from pipeline.inference import metrics as M
from pipeline.ops.soak_clean import CHAIN_STEPS

TINY_ASR = [
    "asr=tiny",
    "batch_size=4",
    "max_samples=8",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "trainer.epochs=1",
    "trainer.max_steps=2",
    "checkpoint.save_interval=2",
    "validation.interval=0",
]
QUALITY = ["pesq_wb", "stoi", "estoi", "si_sdr", "lsd", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"]


def test_metrics_against_known_cases():
    rng = np.random.default_rng(0)
    clean = np.sin(2 * np.pi * 220 * np.arange(32000) / 16000) * (1 + 0.5 * rng.standard_normal(32000))
    noise = rng.standard_normal(32000)
    noise *= np.linalg.norm(clean) / np.linalg.norm(noise) / 10 ** (10 / 20)  # 10 dB SNR
    assert M.si_sdr(clean, 0.3 * clean) > 100  # scale does not matter
    assert M.si_sdr(clean, clean + noise) == pytest.approx(10.0, abs=0.2)
    assert M.log_spectral_distance(clean, clean) == 0.0 and M.log_spectral_distance(clean, clean + noise) > 0.1
    assert np.isnan(M.pesq_wb(np.zeros(16000), np.zeros(16000)))  # no speech: undefined, not an exception


def test_the_sentence_under_the_table_puts_intelligibility_first():
    from pipeline.inference.summary import verdict

    def scores(stoi, pesq, ovrl):
        return {
            "eval/degraded/stoi": 0.7,
            "eval/restored/stoi": stoi,
            "eval/degraded/pesq_wb": 1.1,
            "eval/restored/pesq_wb": pesq,
            "eval/degraded/dnsmos_ovrl": 2.1,
            "eval/restored/dnsmos_ovrl": ovrl,
        }

    assert (
        verdict(scores(0.8, 1.5, 2.5))
        == "Restored audio is better than the degraded input on STOI, PESQ-WB, DNSMOS OVRL."
    )
    assert verdict(scores(0.5, 1.0, 2.0)).startswith("Restored audio is worse than the degraded input on STOI, PESQ-WB")
    # the tiny demo's case: a buzz that DNSMOS likes, with fewer words understood
    assert verdict(scores(0.55, 1.14, 2.27)).endswith("so this chain does not improve its input yet.")
    assert verdict(scores(0.8, 1.0, 2.5)) == (
        "Restored audio is better than the degraded input on STOI, DNSMOS OVRL and worse on PESQ-WB."
    )
    assert verdict({"eval/copy_synthesis/stoi": 0.6}) == ""  # nothing restored: no sentence


def test_the_same_score_again_never_takes_champion_from_a_version_however_it_rounds(store):
    """@champion moves only to a higher score; a score recorded rounded down (0.49412 as "0.4941") once made the
    same chain, scored again, look higher than itself. Scores whose 4-decimal text rounds down and up."""
    from pipeline.inference.registry import MODEL_NAME, SCORE_TAG, record_evaluation

    client = MlflowClient()
    client.create_registered_model(MODEL_NAME)
    versions = [client.create_model_version(MODEL_NAME, f"file://{store}/model-{i}").version for i in range(4)]

    def record(version, score):
        return record_evaluation(client, version, {"eval/restored/stoi": score}, "run", "demo", ["chain"])

    for first, second, score in ((versions[0], versions[1], 0.49412345), (versions[2], versions[3], 0.49418765)):
        record(first, score)
        assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == first
        assert float(client.get_model_version(MODEL_NAME, first).tags[SCORE_TAG.format(metric="stoi")]) == score
        assert "not above" in record(second, score)
        assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == first
        client.delete_registered_model_alias(MODEL_NAME, "champion")


@pytest.fixture(scope="module")
def asr_run(chain):
    """A tiny train_asr run in the chain's tracking store."""
    from pipeline.stages.train_asr import TrainAsr

    assert run_stage(TrainAsr, TINY_ASR) == EXIT_OK
    return stage_runs(MlflowClient(), "train_asr")[0].info.run_id


def evaluations(client: MlflowClient, mode: str):
    return [r for r in stage_runs(client, "evaluate") if r.data.tags["eval.mode"] == mode]


def test_evaluate_a_chain_with_asr_then_reuse_the_run(chain, asr_run, tmp_path, capsys):
    client = MlflowClient()
    assert evaluate([f"run_id={chain['finetune']}", f"asr_run={asr_run}", "test_size=2"]) == EXIT_OK
    out = capsys.readouterr().out
    [run] = evaluations(client, "chain")
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["eval.vocoder_run"], tags["eval.adapter_run"], tags["eval.asr_run"]) == (
        chain["finetune"],
        chain["adapter"],
        asr_run,
    )
    assert client.get_run(chain["finetune"]).data.tags["evaluation.run"] == run.info.run_id
    assert client.get_run(asr_run).data.tags["evaluation.run"] == run.info.run_id

    table = json.loads((artifact_dir(client, run.info.run_id) / "eval" / "files.json").read_text())
    assert set(table["columns"]) >= {"file", "condition", "text", "transcript", "cer", "wer", *QUALITY}
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted({r["condition"] for r in rows}) == ["copy_synthesis", "degraded", "restored"]
    assert len(rows) == 2 * 3
    for r in rows:
        assert all(np.isfinite(r[m]) for m in ("stoi", "si_sdr", "lsd", "dnsmos_ovrl", "cer", "wer")), r
        assert 1.0 <= r["dnsmos_ovrl"] <= 5.0 and 0 <= r["cer"]

    metrics = run.data.metrics
    for condition in ("degraded", "restored", "copy_synthesis"):
        for metric in ("stoi", "estoi", "si_sdr", "lsd", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "cer", "wer"):
            assert f"eval/{condition}/{metric}" in metrics, (condition, metric)
    assert metrics["eval/delta/stoi"] == pytest.approx(metrics["eval/restored/stoi"] - metrics["eval/degraded/stoi"])
    files = {p.name for p in (artifact_dir(client, run.info.run_id) / "listening").iterdir()}
    assert "index.html" in files and {"DEMO-0035_restored.wav", "DEMO-0035_copy_synthesis.wav"} <= files
    assert (artifact_dir(client, run.info.run_id) / "eval" / "conditions.png").stat().st_size > 1000
    assert "restored" in out and "pesq_wb" in out

    # the same evaluation again, through `mlflow run` (overrides as one word): reused
    done = subprocess.run(
        [
            str(Path(VENV_BIN) / "mlflow"),
            "run",
            str(REPO),
            "-e",
            "evaluate",
            "--env-manager",
            "local",
            "-P",
            f"run_id={chain['finetune']}",
            "-P",
            f"asr_run={asr_run}",
            "-P",
            "overrides=test_size=2 seed=1234",
        ],
        cwd=tmp_path,
        env=env_for(chain["dir"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Reusing finished evaluation run {run.info.run_id}" in done.stderr
    assert len(evaluations(client, "chain")) == 1
    assert evaluate([f"run_id={chain['finetune']}", f"asr_run={asr_run}", "test_size=2", "seed=7"]) == EXIT_OK
    assert len(evaluations(client, "chain")) == 2  # another test set: a new run


def test_evaluate_an_asr_run_and_real_noisy_recordings(chain, asr_run, tmp_path):
    client = MlflowClient()
    assert evaluate([f"run_id={asr_run}", "test_size=2"]) == EXIT_OK
    [asr] = evaluations(client, "asr")
    assert asr.data.tags["eval.mode"] == "asr"
    assert {"eval/clean/cer", "eval/degraded/wer"} <= set(asr.data.metrics)

    noisy = tmp_path / "recordings"
    noisy.mkdir()
    tone = np.sin(np.arange(24000) / 9.0) * 0.3
    sf.write(noisy / "a.wav", tone + 0.05 * np.random.default_rng(1).standard_normal(len(tone)), 16000)
    (noisy / "sub").mkdir()
    sf.write(noisy / "sub" / "a.wav", tone + 0.05 * np.random.default_rng(2).standard_normal(len(tone)), 16000)
    (noisy / "broken.wav").write_bytes(b"RIFF nope")
    assert evaluate([f"run_id={chain['finetune']}", f"noisy_dir={noisy}"]) == EXIT_OK
    [run] = evaluations(client, "noisy")
    assert {"eval/input/dnsmos_ovrl", "eval/restored/dnsmos_ovrl", "eval/delta/dnsmos_ovrl"} <= set(run.data.metrics)
    assert not any("pesq" in k for k in run.data.metrics)  # no reference: no intrusive metric
    table = json.loads((artifact_dir(client, run.info.run_id) / "eval" / "files.json").read_text())
    files = {dict(zip(table["columns"], row))["file"] for row in table["data"]}
    assert files == {"a.wav", "sub/a.wav"}  # the folders kept: two files of one name stay two rows
    assert run.data.tags["mlflow.note.content"].startswith(
        f"**Evaluation** · noisy · 3 recordings of noisy_dir={noisy}"
    )


@pytest.mark.parametrize("chain", list(CHAINS), indirect=True)  # every kind of chain restores alike
def test_an_evaluation_explains_itself_and_the_registry_keeps_the_best_chain_as_champion(chain, tmp_path, capsys):
    """The evaluation run: a description (what, test set, verdict, table, listening page) and its test set as a
    dataset input. The registered version it scored: a description and score tags; @champion set for the first
    version scored, kept when another scores no higher, moved when one scores higher, and never compared across
    test sets."""
    import mlflow

    client = MlflowClient()
    finetune = chain["finetune"]
    first = mlflow.register_model(f"runs:/{finetune}/model", "speech-restoration").version
    second = mlflow.register_model(f"runs:/{finetune}/model", "speech-restoration").version
    assert evaluate([f"model_uri=models:/speech-restoration/{first}", "test_size=2", "seed=11"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Restored audio " in out and "than the degraded input on" in out  # the sentence under the table
    run = [r for r in evaluations(client, "chain") if r.data.params.get("seed") == "11"][0]
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**Evaluation** · chain · the last 2 utterances of data=demo, degradation=default, seed=11")
    assert "than the degraded input on" in note and f"(`{finetune}`)" in note and f"(`{chain['adapter']}`)" in note
    assert f"Registered model: `models:/speech-restoration/{first}`" in note and "| stoi |" in note
    assert "artifactPath/listening/index.html" in note
    architecture = {  # which front end and vocoder the chain uses, in the run's and the version's description
        "tiny": "front end `tiny` (hubert, layer 2) with parallel adapters, vocoder `tiny` (hifigan)",
        "logmel_vocos": "front end `logmel` (logmel, layer 1) with feature cleaner, vocoder `vocos_tiny` (vocos)",
    }[chain["kind"]]
    assert f"chain: {architecture}" in note
    (dataset,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.name == "demo-test" and dataset.tags[0].value == "evaluation"

    version = client.get_model_version("speech-restoration", first)
    assert version.tags["eval.run"] == run.info.run_id and float(version.tags["eval.restored.stoi"]) > 0
    assert finetune in version.description and "Evaluated by run" in version.description
    assert architecture in version.description
    assert client.get_model_version_by_alias("speech-restoration", "champion").version == first

    assert evaluate([f"model_uri=models:/speech-restoration/{second}", "test_size=2", "seed=11"]) == EXIT_OK
    assert client.get_model_version_by_alias("speech-restoration", "champion").version == first  # not higher
    client.set_model_version_tag("speech-restoration", first, "eval.restored.stoi", "0.0")  # as if it scored lower
    assert evaluate([f"model_uri=models:/speech-restoration/{second}", "test_size=2", "seed=11"]) == EXIT_OK  # reused
    assert client.get_model_version_by_alias("speech-restoration", "champion").version == second
    assert evaluate([f"model_uri=models:/speech-restoration/{first}", "test_size=2", "seed=12"]) == EXIT_OK
    assert client.get_model_version_by_alias("speech-restoration", "champion").version == second  # other test set


@pytest.fixture(scope="module")
def warm_vocoder(chain):
    """A pretrain_vocoder run with two checkpoints whose first steps are the mel-only warm-up."""
    from pipeline.stages.pretrain_vocoder import PretrainVocoder

    steps = [w for w in CHAIN_STEPS if not w.startswith("trainer.max_steps")]
    assert (
        run_stage(
            PretrainVocoder,
            [
                "ssl=tiny",
                "vocoder=tiny",
                *steps,
                "trainer.max_steps=4",
                "loss.gan_start_step=2",
                "trainer.log_interval=1",
            ],
        )
        == EXIT_OK
    )
    return stage_runs(MlflowClient(), "pretrain_vocoder")[-1].info.run_id


def test_mel_warm_up_runs_the_generator_alone_then_the_gan(warm_vocoder):
    client = MlflowClient()
    history = {
        key: [m.step for m in client.get_metric_history(warm_vocoder, key)]
        for key in ("train/mel", "train/adv", "train/d_loss", "grad_norm/discriminator")
    }
    assert history["train/mel"] == [1, 2, 3, 4]
    assert history["train/adv"] == history["train/d_loss"] == history["grad_norm/discriminator"] == [3, 4]


def test_learning_curves_by_checkpoint_step(chain, warm_vocoder, tmp_path, capfd):
    client = MlflowClient()
    assert evaluate([f"run_id={warm_vocoder}", "steps=all", "test_size=2"]) == EXIT_OK
    [run] = evaluations(client, "vocoder")  # a pretrain_vocoder run: copy synthesis, no restoration
    assert run.data.params["vocoder_step"] == "2,4" and run.data.tags["eval.vocoder_run"] == warm_vocoder
    for key in ("eval/copy_synthesis/stoi", "eval/copy_synthesis/pesq_wb", "eval/degraded/dnsmos_ovrl"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    assert not any("restored" in k or "delta" in k for k in run.data.metrics)
    degraded = client.get_metric_history(run.info.run_id, "eval/degraded/stoi")
    assert degraded[0].value == degraded[1].value  # scored once: it does not depend on the checkpoint
    table = json.loads((artifact_dir(client, run.info.run_id) / "eval" / "files.json").read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted((r["step"], r["condition"]) for r in rows) == sorted(
        (step, cond) for step in (2, 4) for cond in ("degraded", "copy_synthesis") for _ in range(2)
    )
    assert (artifact_dir(client, run.info.run_id) / "eval" / "curves.png").stat().st_size > 1000

    # one chosen step of a finetune_vocoder run: the whole chain, logged at that step
    assert evaluate([f"run_id={chain['finetune']}", "steps=2", "test_size=2"]) == EXIT_OK
    [curve] = [r for r in evaluations(client, "chain") if r.data.params["steps"] == "2"]
    assert [m.step for m in client.get_metric_history(curve.info.run_id, "eval/delta/stoi")] == [2]

    before = snapshot(client)
    for args, message in [
        (
            [f"run_id={warm_vocoder}", "steps=2,3"],
            f"Run {warm_vocoder} has no stored checkpoint at step 3; stored steps: 2, 4",
        ),
        ([f"run_id={warm_vocoder}", "checkpoint=3"], "no stored checkpoint at step 3"),
        ([f"run_id={warm_vocoder}", "steps=last"], "steps='last'; give all or step numbers"),
        ([f"run_id={warm_vocoder}", f"noisy_dir={tmp_path}"], "has no adapters to restore noisy_dir"),
        (["model_uri=models:/speech-restoration/1", "steps=all"], "give run_id="),
    ]:
        capfd.readouterr()
        assert evaluate(args) == EXIT_BAD_INPUT, args
        err = capfd.readouterr().err
        assert message in err and "Traceback" not in err, (message, err[-2000:])
    assert snapshot(client) == before


def test_bad_input_gives_one_message_exit_2_and_no_run(chain, tmp_path, capfd):
    client = MlflowClient()
    unusable = tmp_path / "unusable"  # recordings of which none can be scored
    unusable.mkdir()
    (unusable / "broken.wav").write_bytes(b"RIFF nope")
    (unusable / "notes.flac").write_text("not audio")
    sf.write(unusable / "silent.wav", np.zeros(8000), 16000)
    corpus = tmp_path / "corpus"  # an LJSpeech layout whose test files are broken or missing
    (corpus / "wavs").mkdir(parents=True)
    (corpus / "metadata.csv").write_text("a|one\nb|two\nc|three\n")
    (corpus / "wavs" / "b.wav").write_bytes(b"RIFF nope")
    cases = [
        (
            [f"run_id={chain['finetune']}", f"noisy_dir={unusable}"],
            f"Nothing to evaluate: none of the 3 audio files of noisy_dir={unusable} is usable "
            "(silent: 1, unreadable: 2; e.g. ",
        ),
        (
            [f"run_id={chain['finetune']}", "data=ljspeech", f"data_root={corpus}", "test_size=2"],
            "none of the 2 audio files of the last test_size=2 utterances of data=ljspeech is usable "
            "(missing: 1, unreadable: 1",
        ),
        ([f"run_id={'0' * 32}"], "not found in the tracking store"),
        ([f"run_id={chain['adapter']}"], "is a train_adapter run, not a finetune_vocoder run"),
        ([f"run_id={chain['finetune']}", "data=nope"], "data='nope': no such preset"),
        ([f"run_id={chain['finetune']}", "test_size=400"], "test_size=400 but the corpus has 36"),
        ([f"run_id={chain['finetune']}", f"noisy_dir={tmp_path / 'missing'}"], "input not found"),
        ([f"run_id={chain['finetune']}", f"asr_run={chain['adapter']}"], "not a train_asr run"),
        (["test_size=2"], "Give exactly one of"),
    ]
    before = snapshot(client)
    for args, message in cases:
        capfd.readouterr()
        assert evaluate(args) == EXIT_BAD_INPUT, args
        err = capfd.readouterr().err
        assert message in err and "Traceback" not in err, (message, err[-2000:])
    assert snapshot(client) == before
