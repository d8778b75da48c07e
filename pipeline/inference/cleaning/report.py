"""What a finished cleaning job shows in its run: summary figures, a histogram of the scores and a listening
page (a random sample, and the lowest-scored items, input beside restored)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.inference.cleaning.dataflow import SCORES
from pipeline.inference.cleaning.sources import read_bytes

log = logging.getLogger(__name__)


def summary(table: pd.DataFrame) -> dict[str, float]:
    """The job's headline figures (logged as metrics): counts, audio hours and mean scores of restored rows."""
    status = table["status"].astype(str)
    restored = table[status == "restored"]
    out = {
        "files": float(len(table)),
        "restored": float(len(restored)),
        "skipped": float(status.str.startswith("skipped").sum()),
        "failed": float(status.str.startswith("failed").sum()),
        "kept": float(table["keep"].sum()) if "keep" in table else float(len(restored)),
        "audio_hours": float(pd.to_numeric(restored["seconds"]).sum() / 3600.0),
    }
    for name in SCORES:
        values = pd.to_numeric(restored[name], errors="coerce").dropna()
        if len(values):
            out[f"mean_{name}"] = float(values.mean())
    return out


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per score of the restored rows: count, mean, 10th/50th/90th percentile; and the reasons counted."""
    restored = table[table["status"] == "restored"]
    rows = []
    for name in SCORES:
        values = pd.to_numeric(restored[name], errors="coerce").dropna()
        rows.append(
            {
                "what": name,
                "count": len(values),
                "mean": values.mean() if len(values) else np.nan,
                **{f"p{q}": values.quantile(q / 100) if len(values) else np.nan for q in (10, 50, 90)},
            }
        )
    reasons = table["status"].astype(str).str.split(":").str[:2].str.join(":")
    for reason, count in reasons.value_counts().sort_index().items():
        rows.append({"what": f"status {reason}", "count": int(count)})
    return pd.DataFrame(rows)


def histogram(table: pd.DataFrame, path: Path) -> None:
    """DNSMOS OVRL/SIG/BAK of input and restored audio, and speaker similarity, as histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    restored = table[table["status"] == "restored"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, name in zip(axes, ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak")):
        for column, label in ((f"input_{name}", "input"), (name, "restored")):
            values = pd.to_numeric(restored[column], errors="coerce").dropna()
            ax.hist(values, bins=np.linspace(1, 5, 33), alpha=0.6, label=label)
        ax.set_title(name.upper().replace("_", " "))
        ax.legend()
    values = pd.to_numeric(restored["speaker_similarity"], errors="coerce").dropna()
    axes[3].hist(values, bins=np.linspace(-1, 1, 41))
    axes[3].set_title("speaker similarity (input, restored)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def listening_examples(table: pd.DataFrame, sample: int, lowest: int, seed: int = 0) -> list[tuple[str, pd.Series]]:
    """(why, row) of ``sample`` random restored rows and the ``lowest`` by restored DNSMOS OVRL."""
    restored = table[table["status"] == "restored"]
    picked = restored.sample(n=min(sample, len(restored)), random_state=seed) if sample else restored.iloc[:0]
    rest = restored.drop(index=picked.index)
    worst = rest.assign(_o=pd.to_numeric(rest["dnsmos_ovrl"], errors="coerce")).sort_values("_o").head(lowest)
    return [("random", row) for _, row in picked.iterrows()] + [("lowest OVRL", row) for _, row in worst.iterrows()]


def _input_audio(source: str) -> tuple[np.ndarray, int]:
    from pipeline.data.audio import decode_channels
    from pipeline.data.shards import ShardStore, read_shard

    if "#" in source:  # a shard member: <root>/<shard>.tar#<key>.noisy.wav
        shard, _, member = source.partition("#")
        root, _, name = shard.rpartition("/")
        store = ShardStore(root)
        sample = next(s for s in read_shard(store, _shard_info(store, name)) if s["key"] == member.split(".")[0])
        return sample["noisy"].numpy(), int(sample["meta"]["sample_rate"])
    audio, rate = decode_channels(read_bytes(source), source)
    return audio.numpy().mean(axis=0), rate


def _shard_info(store, name: str) -> dict:
    import json

    manifest = json.loads(store.read_bytes("manifest.json"))
    return next(info for split in manifest["splits"].values() for info in split["shards"] if info["name"] == name)


def write_page(table: pd.DataFrame, out_dir: Path, title: str, sample: int, lowest: int) -> None:
    from pipeline.data.audio import decode_channels
    from pipeline.inference.listening import Example, write_listening_page

    examples = []
    for why, row in listening_examples(table, sample, lowest):
        try:
            source, rate = _input_audio(row["source"])
            restored, rate_out = decode_channels(read_bytes(row["output"]), row["output"])
        except Exception as err:  # an input moved since: the page goes on without it
            log.warning("Listening page: cannot read %s (%s)", row["id"], err)
            continue
        info = f"{why}; " + ", ".join(f"{k} {float(row[k]):.2f}" for k in SCORES if pd.notna(row[k]))
        examples.append(
            Example(
                row["id"],
                audio={"input": source, "restored": restored.numpy().mean(axis=0)},
                info=info,
                rates={"input": rate, "restored": rate_out},
            )
        )
    write_listening_page(out_dir, title, examples, int(table["output_rate"].dropna().iloc[0]) if len(table) else 16000)
