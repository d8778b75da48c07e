"""The chain's ceiling per front end (``--only encoder_ceiling``): copy synthesis with the same generator, loss and
steps on each front end's features of clean speech.

Copy synthesis (the vocoder on the frozen front end's features of clean speech) bounds what the whole chain can
reach: the cleaner or the adapters can at best give the vocoder the clean features. A randomly initialised SSL
encoder (nothing may be downloaded here) keeps too little spectral detail; a log-mel analysis keeps it. Each row
trains ``pretrain_vocoder`` (mel loss only) for the same steps in a throwaway store, then scores it with
``pipeline.evaluate`` on the held-out files: STOI and PESQ-WB of copy synthesis, as docs/benchmarks.md reports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from pipeline.bench import figure
from pipeline.bench.harness import new_run, run_ids, tracking_store

# front end -> its overrides; the generators each is measured with
FRONT_ENDS: dict[str, list[str]] = {
    "tiny_encoder_l2": ["ssl=tiny"],
    "hubert_base_shape_l1": ["ssl=hubert_base", "ssl.layer=1"],
    "logmel": ["ssl=logmel"],
}
GENERATORS: dict[str, list[str]] = {"hifigan_tiny": ["vocoder=tiny"], "vocos_tiny": ["vocoder=vocos_tiny"]}
TRAINING = ["data.segment_seconds=0.5", "optim.lr=2e-3", "batch_size=8", "tracking.system_metrics=false"]


def _run(module: str, args: list[str], env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-3000:]}")


def copy_synthesis(front_end: list[str], generator: list[str], steps: int, test_size: int) -> dict[str, float]:
    """Train a vocoder on ``front_end``'s features for ``steps`` mel-only steps; its copy-synthesis scores on the
    last ``test_size`` demo files, with the training's seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with tracking_store() as client:
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
        before = run_ids(client)
        start = time.perf_counter()
        schedule = [
            f"trainer.max_steps={steps}",
            f"loss.gan_start_step={steps + 1}",
            f"checkpoint.save_interval={steps}",
        ]
        _run("pipeline.stages.pretrain_vocoder", [*front_end, *generator, *TRAINING, *schedule], env)
        seconds = time.perf_counter() - start
        vocoder_run = new_run(client, before)
        before = run_ids(client)
        _run("pipeline.evaluate", [f"run_id={vocoder_run}", f"test_size={test_size}"], env)
        metrics = client.get_run(new_run(client, before)).data.metrics
    scores = {name: metrics[f"eval/copy_synthesis/{name}"] for name in ("stoi", "pesq_wb")}
    return {**scores, "train_s": seconds}


def ceiling_figures(*, steps: int = 1500, test_size: int = 4, generators: tuple[str, ...] = tuple(GENERATORS)):
    """One figure per front end and generator: copy-synthesis STOI (PESQ-WB and the training time beside it)."""
    figures: list[dict[str, Any]] = []
    for front_name, front_end in FRONT_ENDS.items():
        for generator_name in generators:
            scores = copy_synthesis(front_end, GENERATORS[generator_name], steps, test_size)
            figures.append(
                figure(
                    f"encoder_ceiling/{front_name}/{generator_name}",
                    scores["stoi"],
                    "STOI",
                    f"copy synthesis of the {test_size} held-out demo files after {steps} mel-only pretrain_vocoder "
                    f"steps ({' '.join(TRAINING[:3])}) on {' '.join(front_end)} features",
                    pesq_wb=round(scores["pesq_wb"], 3),
                    train_s=round(scores["train_s"], 1),
                )
            )
    return figures
