"""import_checkpoint as an MLproject entry point: `mlflow run . -e import_checkpoint`."""

import pytest
from miipher2_reference import (
    QUICK,
    SSL,
    VOCODER,
    adapter_checkpoint,
    mhubert,  # noqa: F401 (a fixture the tests request by name)
    vocoder_checkpoint,
)
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_mlflow_run_entry_point_imports_into_its_own_run(store, mhubert):
    from helpers import mlflow_run

    model, mhubert_dir = mhubert
    adapter_checkpoint(model, store / "checkpoint_199k.pt")
    vocoder_checkpoint(store / "epoch=77-step=137108.ckpt")
    overrides = " ".join([*SSL, f"ssl.weights={mhubert_dir}", *QUICK, *(f"finetune_vocoder.{o}" for o in VOCODER)])
    done = mlflow_run(
        store,
        f"adapter={store / 'checkpoint_199k.pt'}",
        f"vocoder={store / 'epoch=77-step=137108.ckpt'}",
        f"overrides={overrides}",
        entry="import_checkpoint",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    assert set(by_stage) == {"train_adapter", "finetune_vocoder"} and len(runs) == 2  # no stray launcher run
    assert all(r.info.status == "FINISHED" and r.data.tags["checkpoint.latest_step"] == "0" for r in runs)
    assert by_stage["train_adapter"].data.params["adapter"].endswith("checkpoint_199k.pt")  # mlflow run's own run
