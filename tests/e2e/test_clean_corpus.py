"""clean_corpus: a corpus cleaned by the tiny chain on a local Ray, tracked, resumable (docs/cleaning.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import soundfile as sf
from helpers import CHAINS, CLEAN_FAST, PYTHON, demo_wave, env_for, free_port, mlflow_run, snapshot, wait_for
from mlflow import MlflowClient
from scipy.signal import resample_poly

from pipeline.clean_corpus import run as clean_corpus
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED, EXIT_STORAGE
from pipeline.inference.batched import BATCH_TOLERANCE
from pipeline.inference.cleaning.manifest import KeepConfig, committed_rows, keep_column
from pipeline.restore import run as restore

pytestmark = pytest.mark.slow
PCM16_STEP = 1 / 32768
# a padded batch equals one-by-one restoration within BATCH_TOLERANCE; both are then rounded to 16 bits
SAME_SAMPLES = BATCH_TOLERANCE + 2 * PCM16_STEP


def mixed_corpus(root: Path) -> Path:
    """A nested tree: 16 kHz mono, 44.1 kHz stereo FLAC, 8 kHz OGG, a silent and a broken file."""
    (root / "sub" / "deeper").mkdir(parents=True)
    clean, rate = demo_wave(0)
    other, _ = demo_wave(1)
    sf.write(root / "a.wav", clean, rate)
    sf.write(root / "short.wav", other[: rate * 2], rate)
    stereo = np.stack([resample_poly(other, 441, 160), 0.5 * resample_poly(other, 441, 160)], axis=1)
    sf.write(root / "sub" / "stereo_44k.flac", stereo, 44100)
    sf.write(root / "sub" / "deeper" / "low_8k.ogg", resample_poly(clean, 1, 2), 8000)
    sf.write(root / "sub" / "silent.wav", np.zeros(8000, dtype=np.float32), 16000)
    (root / "sub" / "broken.wav").write_bytes(b"RIFF not really audio")
    return root


def outputs_equal_restore(chain, source: Path, manifest: pd.DataFrame, tmp: Path) -> None:
    """Every restored file equals what `restore` (one file, one chunk at a time) makes of its input."""
    reference = tmp / "reference"
    assert restore([f"run_id={chain['finetune']}", f"input={source}", f"output={reference}"]) == EXIT_OK
    restored = manifest[manifest.status == "restored"]
    assert len(restored)
    for row in restored.itertuples():
        ours, rate = sf.read(row.output)
        theirs, _ = sf.read(str(reference / Path(row.id).with_suffix(".wav")))
        assert rate == row.output_rate and ours.shape == theirs.shape, row.id
        assert np.abs(ours - theirs).max() <= SAME_SAMPLES, row.id


def the_run(client: MlflowClient):
    runs = client.search_runs(
        [client.get_experiment_by_name("clean_corpus").experiment_id], order_by=["attributes.start_time DESC"]
    )
    return runs[0]


@pytest.mark.parametrize("chain", list(CHAINS), indirect=True)  # every kind of chain restores alike
def test_a_mixed_tree_is_cleaned_into_a_complete_manifest_equal_to_restore(chain, tmp_path, capfd):
    source, out = mixed_corpus(tmp_path / "crawl"), tmp_path / "clean"
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    argv = [
        f"run_id={chain['finetune']}",
        f"input={source}",
        f"output={out}",
        "keep.min_seconds=2.5",
        "keep.min_speaker_similarity=-1",
        *CLEAN_FAST,
    ]
    sigterm = signal.getsignal(signal.SIGTERM)
    assert clean_corpus(argv) == EXIT_OK
    assert signal.getsignal(signal.SIGTERM) is sigterm  # ray.init's sys.exit handler does not outlive the job

    manifest = pd.read_parquet(out / "manifest.parquet").set_index("id", drop=False)
    assert sorted(manifest.index) == [
        "a.wav",
        "short.wav",
        "sub/broken.wav",
        "sub/deeper/low_8k.ogg",
        "sub/silent.wav",
        "sub/stereo_44k.flac",
    ]
    assert manifest.loc["sub/broken.wav", "status"].startswith("skipped: unreadable")
    assert "BytesIO" not in manifest.loc["sub/broken.wav", "status"]
    assert manifest.loc["sub/silent.wav", "status"].startswith("skipped: silent")
    assert (manifest.loc["sub/stereo_44k.flac", ["input_rate", "input_channels"]] == [44100, 2]).all()
    assert manifest.loc["sub/deeper/low_8k.ogg", "input_rate"] == 8000
    assert sf.info(out / "sub" / "stereo_44k.wav").channels == 2
    restored = manifest[manifest.status == "restored"]
    assert (
        len(restored) == 4 and restored[["dnsmos_ovrl", "input_dnsmos_ovrl", "speaker_similarity"]].notna().all().all()
    )
    assert restored.dnsmos_ovrl.between(1, 5).all() and restored.speaker_similarity.between(-1, 1).all()
    # keep: restored, at least 2.5 s (a.wav is 3.1 s, short.wav 2.0 s)
    assert manifest["keep"].to_dict() == {
        "a.wav": True,
        "short.wav": False,
        "sub/stereo_44k.flac": True,
        "sub/deeper/low_8k.ogg": True,
        "sub/broken.wav": False,
        "sub/silent.wav": False,
    }
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before  # inputs untouched
    outputs_equal_restore(chain, source, manifest, tmp_path)

    client = MlflowClient()
    run = the_run(client)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "clean_corpus"
    assert run.data.tags["progress"].startswith("6/6 inputs")
    assert f"-P resume_run={run.info.run_id}" in run.data.tags["mlflow.note.content"]
    assert run.data.params["keep.min_seconds"] == "2.5" and run.data.params["chain.vocoder_run"] == chain["finetune"]
    done = client.get_metric_history(run.info.run_id, "progress/files_done")
    assert [m.step for m in done] == sorted({m.step for m in done}) and done[-1].step == 6
    assert client.get_metric_history(run.info.run_id, "summary/kept")[-1].value == 3
    artifacts = {
        f.path for d in ("manifest", "plots", "listening", "summary") for f in client.list_artifacts(run.info.run_id, d)
    }
    assert {
        "manifest/manifest.parquet",
        "plots/scores.png",
        "listening/index.html",
        "summary/summary.json",
    } <= artifacts

    capfd.readouterr()  # a finished job resumed: nothing to do
    assert clean_corpus([f"resume_run={run.info.run_id}"]) == EXIT_OK
    assert "is finished: nothing to resume" in capfd.readouterr().err


def test_keep_is_exactly_the_rows_meeting_every_threshold():
    table = pd.DataFrame(
        {
            "status": ["restored", "restored", "restored", "skipped: silent", "restored"],
            "dnsmos_ovrl": [3.5, 2.9, np.nan, np.nan, 3.0],
            "speaker_similarity": [0.8, 0.9, 0.9, np.nan, 0.74],
            "seconds": [3.0, 3.0, 3.0, 0.0, 3.0],
            "dnsmos_sig": 3.0,
            "dnsmos_bak": 3.0,
        }
    )
    keep = keep_column(table, KeepConfig(min_ovrl=3.0, min_speaker_similarity=0.75))
    assert keep.tolist() == [True, False, False, False, False]
    assert keep_column(table, KeepConfig()).tolist() == [True, True, True, False, True]


def test_a_job_killed_with_its_workers_is_finished_by_resume_run_each_input_once(chain, tmp_path):
    source, out = tmp_path / "many", tmp_path / "clean"
    source.mkdir()
    clean, rate = demo_wave(2)
    for i in range(24):  # short files in many batches, so the kill lands between two commits
        sf.write(source / f"utt{i:02d}.wav", clean[i * 100 : i * 100 + int(1.3 * rate)], rate)
    argv = [f"run_id={chain['finetune']}", f"input={source}", f"output={out}", *CLEAN_FAST]
    job = subprocess.Popen(
        [PYTHON, "-m", "pipeline.clean_corpus", *argv],
        cwd=chain["dir"],
        env=env_for(chain["dir"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = MlflowClient()

    def committed():
        experiment = client.get_experiment_by_name("clean_corpus")
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        return runs and len(client.list_artifacts(runs[0].info.run_id, "manifest/parts")) >= 1 and runs[0]

    run = wait_for(committed, timeout=600, what="a first committed part", proc=job)
    family = [job.pid, *(p.pid for p in psutil.Process(job.pid).children(recursive=True))]
    for pid in family:  # the node is lost: the driver, Ray and its workers
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    before = client.get_run(run.info.run_id)
    assert before.info.status == "RUNNING" and not before.data.tags["progress"].startswith("24/24")

    # resumed, then stopped from the dashboard (the run's stop_requested tag) once it has committed more
    parts = len(client.list_artifacts(run.info.run_id, "manifest/parts"))

    def stop_after_a_commit():
        wait_for(
            lambda: len(client.list_artifacts(run.info.run_id, "manifest/parts")) > parts,
            timeout=600,
            what="a commit of the resumed job",
        )
        client.set_tag(run.info.run_id, "stop_requested", "true")

    stopper = threading.Thread(target=stop_after_a_commit)
    stopper.start()
    assert clean_corpus([f"resume_run={run.info.run_id}"]) == EXIT_STOPPED
    stopper.join()
    stopped = client.get_run(run.info.run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags["mlflow.note.content"].startswith("**STOPPED**")
    assert not stopped.data.tags["progress"].startswith("24/24") and not (out / "manifest.parquet").exists()
    client.delete_tag(run.info.run_id, "stop_requested")

    assert clean_corpus([f"resume_run={run.info.run_id}"]) == EXIT_OK
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(manifest.id) == [f"utt{i:02d}.wav" for i in range(24)]  # every input exactly once
    assert (manifest.status == "restored").all()
    assert not [p for p in out.rglob("*") if "partial" in p.name]  # nothing half written
    outputs_equal_restore(chain, source, manifest, tmp_path)
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resume.count"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "progress/files_done")]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one line, one value per step


def test_s3_input_and_output_through_a_moto_server_with_mlflow_run(chain, s3, tmp_path):
    clean, rate = demo_wave(3)
    for name in ("in/a.wav", "in/sub/b.wav"):
        buffer = tmp_path / "x.wav"
        sf.write(buffer, clean, rate)
        s3.upload_file(str(buffer), "test-bucket", name)
    done = mlflow_run(
        chain["dir"],
        f"run_id={chain['finetune']}",
        "input=s3://test-bucket/in/",
        "output=s3://test-bucket/out",
        f"options=format=flac scores=false {' '.join(CLEAN_FAST)}",
        entry="clean_corpus",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="test-bucket", Prefix="out/")["Contents"]}
    assert keys == {"out/a.flac", "out/sub/b.flac", "out/manifest.parquet"}
    s3.download_file("test-bucket", "out/manifest.parquet", str(tmp_path / "m.parquet"))
    manifest = pd.read_parquet(tmp_path / "m.parquet")
    assert (manifest.status == "restored").all() and set(manifest.source) == {
        "s3://test-bucket/in/a.wav",
        "s3://test-bucket/in/sub/b.wav",
    }
    s3.download_file("test-bucket", "out/a.flac", str(tmp_path / "a.flac"))
    assert sf.info(tmp_path / "a.flac").format == "FLAC" and manifest.speaker_similarity.isna().all()


def test_bad_input_gives_one_message_exit_2_and_writes_nothing(chain, tmp_path, capfd):
    source = mixed_corpus(tmp_path / "crawl")
    out = tmp_path / "clean"
    client = MlflowClient()
    before = snapshot(client)
    model = f"run_id={chain['finetune']}"
    escaping = tmp_path / "crawl.csv"  # a crawl's manifest is third-party data
    pd.DataFrame(
        {"path": [str(source / "a.wav"), str(source / "short.wav")], "id": ["../../escaped", "/srv/other/x"]}
    ).to_csv(escaping, index=False)
    cases = {
        "unknown model": (
            ["run_id=0123456789abcdef0123456789abcdef", f"input={source}", f"output={out}"],
            "0123456789abcdef",
        ),
        "missing input": ([model, f"input={tmp_path / 'nowhere'}", f"output={out}"], "not found"),
        "output inside input": ([model, f"input={source}", f"output={source / 'clean'}"], "is inside input"),
        "threshold out of range": ([model, f"input={source}", f"output={out}", "keep.min_ovrl=7"], "out of range"),
        "unreachable Ray": (
            [model, f"input={source}", f"output={out}", f"ray_address=127.0.0.1:{free_port()}"],
            "Cannot reach the Ray cluster",
        ),
        "a training run resumed": ([f"resume_run={chain['adapter']}"], "not a clean_corpus job"),
        "more workers than the cores hold": (
            [model, f"input={source}", f"output={out}", "workers=4"],
            "leaving none for reading and writing files",
        ),
        "unknown key": ([model, f"input={source}", f"output={out}", "keep.min_ovr=3"], "min_ovr"),
        "manifest ids leading outside the output": (
            [model, f"input={escaping}", f"output={out}"],
            "row 1 (" + str(source / "a.wav"),
        ),
    }
    for name, (argv, message) in cases.items():
        capfd.readouterr()
        assert clean_corpus(argv) == EXIT_BAD_INPUT, name
        err = capfd.readouterr().err
        assert message in err and "Traceback" not in err, (name, err[-2000:])
        assert not out.exists() and not (source / "clean").exists(), name
    assert snapshot(client) == before
    assert not list(tmp_path.parent.glob("escaped*"))


def start_job(chain, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "pipeline.clean_corpus", *argv],
        cwd=chain["dir"],
        env=env_for(chain["dir"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_family(job: subprocess.Popen) -> None:
    """SIGKILL the driver, Ray and its workers (the machine is lost)."""
    family = [job.pid, *(p.pid for p in psutil.Process(job.pid).children(recursive=True))]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()


def test_a_resume_replaces_only_files_the_job_wrote_and_nothing_is_written_through_a_symlink(chain, tmp_path):
    """Defects 1 and 2 (docs/reliability.md): a resumed job replaced a file the user had before the job, and a
    symlink in the output tree led a write outside it."""
    source, out, elsewhere = tmp_path / "crawl", tmp_path / "clean", tmp_path / "elsewhere"
    (source / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    clean, rate = demo_wave(2)
    names = [f"utt{i:03d}.wav" for i in range(5)] + ["sub/x.wav"]
    for i, name in enumerate(names):
        sf.write(source / name, clean[i * 100 : i * 100 + int(1.3 * rate)], rate)
    out.mkdir()
    sf.write(out / "utt000.wav", np.zeros(8000, dtype=np.float32), 8000)  # the user's own file
    theirs = (out / "utt000.wav").read_bytes()
    (out / "sub").symlink_to(elsewhere)  # a symlink inside the output tree
    job = start_job(chain, [f"run_id={chain['finetune']}", f"input={source}", f"output={out}", *CLEAN_FAST])
    client = MlflowClient()

    def running():
        experiment = client.get_experiment_by_name("clean_corpus")
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        return runs and runs[0].data.params and runs[0]  # its settings stored: a run that can be resumed

    run = wait_for(running, timeout=600, what="the job's run", proc=job)
    kill_family(job)  # right after it started
    assert clean_corpus([f"resume_run={run.info.run_id}"]) == EXIT_OK
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("id")
    assert sorted(manifest.index) == sorted(names)
    assert (out / "utt000.wav").read_bytes() == theirs
    assert manifest.loc["utt000.wav", "status"] == "skipped: output exists (overwrite=true replaces it)"
    assert manifest.loc["sub/x.wav", "status"].startswith("skipped: unsafe output name") and not list(
        elsewhere.iterdir()
    )
    assert (manifest.drop(index=["utt000.wav", "sub/x.wav"]).status == "restored").all()


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KB tmpfs (needs root, as CI has): a real ENOSPC, made bigger with ``remount(size)``."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs)")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_output_disk_stops_the_job_cleanly_and_a_resume_after_space_is_freed_finishes_it(
    chain, tmp_path, small_disk, capfd
):
    """Defect 4: 30 inputs failed for good on a full disk and the run ended FAILED with a traceback."""
    mount, remount = small_disk
    source, out = tmp_path / "crawl", mount / "clean"
    source.mkdir()
    clean, rate = demo_wave(2)
    names = [f"utt{i:02d}.wav" for i in range(16)]
    for i, name in enumerate(names):
        sf.write(source / name, clean[i * 100 : i * 100 + int(1.3 * rate)], rate)
    argv = [f"run_id={chain['finetune']}", f"input={source}", f"output={out}", "scores=false", *CLEAN_FAST]
    capfd.readouterr()
    assert clean_corpus(argv) == EXIT_STORAGE
    err = capfd.readouterr().err
    assert "output storage is full" in err and "Traceback" not in err, err[-3000:]
    client = MlflowClient()
    run = the_run(client)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.note.content"].startswith("**STOPPED: output storage full**")
    committed = committed_rows(client, run.info.run_id)
    full = committed[committed.status.str.startswith("failed (retryable): output storage full: cannot write")]
    assert len(full) >= 1 and "No space left on device" in full.status.iloc[0]
    assert len(committed) < len(names) or (committed.status != "restored").any()
    assert not (out / "manifest.parquet").exists() and not list(out.rglob("*.partial"))

    remount("20m")  # space freed
    capfd.readouterr()
    assert clean_corpus([f"resume_run={run.info.run_id}"]) == EXIT_OK
    assert "to try again" in capfd.readouterr().err
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(manifest.id) == names and (manifest.status == "restored").all()  # every input, once
    assert all((out / name).exists() for name in names)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_completely_full_output_disk_restores_nothing_and_loses_nothing(chain, tmp_path, small_disk, capfd):
    """Not one byte free from the start: the first write stops the job; freeing space lets the resume do all."""
    mount, _ = small_disk
    source, out = tmp_path / "crawl", mount / "clean"
    source.mkdir()
    out.mkdir()
    clean, rate = demo_wave(3)
    names = [f"utt{i}.wav" for i in range(3)]
    for i, name in enumerate(names):
        sf.write(source / name, clean[i * 100 : i * 100 + rate], rate)
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    capfd.readouterr()
    assert (
        clean_corpus([f"run_id={chain['finetune']}", f"input={source}", f"output={out}", "scores=false", *CLEAN_FAST])
        == EXIT_STORAGE
    )
    err = capfd.readouterr().err
    assert "output storage is full" in err and "Traceback" not in err, err[-3000:]
    run = the_run(MlflowClient())
    committed = committed_rows(MlflowClient(), run.info.run_id)
    assert not (committed.status == "restored").any() and not [p for p in out.rglob("*") if p.is_file()]
    filler.unlink()
    assert clean_corpus([f"resume_run={run.info.run_id}"]) == EXIT_OK
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(manifest.id) == names and (manifest.status == "restored").all()
