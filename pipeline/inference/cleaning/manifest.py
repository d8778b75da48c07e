"""The manifest of a cleaning job: one row per input, written in parts as the job goes, merged at the end.

The rows of finished inputs are committed as Parquet parts to the job's MLflow run
(``manifest/parts/part-<attempt>-<n>.parquet``), every few seconds; a resumed job reads them back and skips
those inputs. An input whose row was not committed when the job died is restored again (its output file is
replaced whole). The final ``manifest.parquet`` keeps one row per id (the last committed) and adds ``keep``,
from the thresholds of ``KeepConfig``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from pipeline.config import ConfigError

PARTS = "manifest/parts"
PREEXISTING = "manifest/preexisting.parquet"  # the output's audio files before the job wrote any: never replaced
COLUMNS = (
    "id",
    "source",
    "output",
    "status",
    "seconds",
    "input_rate",
    "input_channels",
    "output_rate",
    "restore_seconds",
    "worker",
    "dnsmos_sig",
    "dnsmos_bak",
    "dnsmos_ovrl",
    "input_dnsmos_sig",
    "input_dnsmos_bak",
    "input_dnsmos_ovrl",
    "speaker_similarity",
)


@dataclass
class KeepConfig:
    """Thresholds of the ``keep`` column: a row is kept when it was restored and meets every one given."""

    min_sig: float | None = None  # DNSMOS SIG of the restored audio, 1-5
    min_bak: float | None = None  # DNSMOS BAK of the restored audio, 1-5
    min_ovrl: float | None = None  # DNSMOS OVRL of the restored audio, 1-5
    min_speaker_similarity: float | None = None  # cosine of input and restored speaker embeddings, -1-1
    min_seconds: float | None = None  # duration of the input
    max_seconds: float | None = None


RANGES = {
    "min_sig": (1.0, 5.0),
    "min_bak": (1.0, 5.0),
    "min_ovrl": (1.0, 5.0),
    "min_speaker_similarity": (-1.0, 1.0),
    "min_seconds": (0.0, math.inf),
    "max_seconds": (0.0, math.inf),
}
COLUMN_OF = {
    "min_sig": "dnsmos_sig",
    "min_bak": "dnsmos_bak",
    "min_ovrl": "dnsmos_ovrl",
    "min_speaker_similarity": "speaker_similarity",
    "min_seconds": "seconds",
    "max_seconds": "seconds",
}


def check_keep(keep: KeepConfig) -> None:
    for name, (lo, hi) in RANGES.items():
        value = getattr(keep, name)
        if value is not None and not (lo <= value <= hi):
            raise ConfigError(f"keep.{name}={value} is out of range; give a value from {lo} to {hi}")


def keep_column(table: pd.DataFrame, keep: KeepConfig) -> pd.Series:
    """True for a restored row that meets every threshold given (a NaN score meets none)."""
    kept = table["status"] == "restored"
    for name, column in COLUMN_OF.items():
        value = getattr(keep, name)
        if value is None:
            continue
        scores = pd.to_numeric(table[column], errors="coerce")
        kept &= (scores <= value) if name.startswith("max_") else (scores >= value)
    return kept


def as_table(rows: list[pd.DataFrame]) -> pd.DataFrame:
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=list(COLUMNS))
    return table.reindex(columns=list(COLUMNS))


def commit_part(client: MlflowClient, run_id: str, table: pd.DataFrame, attempt: int, number: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"part-{attempt:03d}-{number:06d}.parquet"
        as_table([table]).to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), PARTS)


def committed_rows(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """Every row the run's parts hold, one per id (the last committed)."""
    from mlflow.artifacts import download_artifacts

    names = [f.path for f in client.list_artifacts(run_id, PARTS) if f.path.endswith(".parquet")]
    if not names:
        return as_table([])
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(download_artifacts(run_id=run_id, artifact_path=PARTS, dst_path=tmp))
        tables = [pd.read_parquet(local / Path(name).name) for name in sorted(names)]
    return as_table(tables).drop_duplicates("id", keep="last").reset_index(drop=True)


def commit_preexisting(client: MlflowClient, run_id: str, names: set[str]) -> None:
    """Record which output names existed before the job wrote anything (its resumes must not replace them)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(PREEXISTING).name
        pd.DataFrame({"output": sorted(names)}, dtype=str).to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), str(Path(PREEXISTING).parent))


def read_preexisting(client: MlflowClient, run_id: str) -> set[str] | None:
    """The output names recorded by ``commit_preexisting``; None when the run has no record (it was stopped
    before writing anything, so what exists now is not its own)."""
    from mlflow.artifacts import download_artifacts

    if not any(f.path == PREEXISTING for f in client.list_artifacts(run_id, str(Path(PREEXISTING).parent))):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(run_id=run_id, artifact_path=PREEXISTING, dst_path=tmp)
        return set(pd.read_parquet(local)["output"].astype(str))
