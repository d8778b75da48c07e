"""The Model Registry record of a restoration chain: which runs and steps each ``speech-restoration`` version
holds, how its evaluation scored, and which version is best (the ``@champion`` alias).

``evaluate`` calls ``record_evaluation`` after it scored a registered chain (``main`` runs that evaluation after
registering the chain). The version gets a description (its runs and steps, the evaluation's verdict and table)
and tags with its headline scores; ``@champion`` moves to it only when it scores higher than the champion on the
primary metric, restored STOI, on the same test set. Serve ``models:/speech-restoration@champion``.
"""

from __future__ import annotations

import logging
import math
import re

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.inference.chain import MODEL_NAME
from pipeline.inference.summary import HEADLINE, markdown_table, verdict

log = logging.getLogger(__name__)

CHAMPION = "champion"
PRIMARY = "stoi"  # eval/restored/stoi: higher is better; what @champion is chosen by
EVAL_RUN_TAG = "eval.run"
TEST_SET_TAG = "eval.test_set"
SCORE_TAG = "eval.restored.{metric}"
_VERSION_URI = re.compile(rf"models:/{re.escape(MODEL_NAME)}/(\d+)$")
_ALIAS_URI = re.compile(rf"models:/{re.escape(MODEL_NAME)}@([\w-]+)$")


def registered_version(client: MlflowClient, model_uri: str | None, run_id: str | None) -> str | None:
    """The ``speech-restoration`` version an evaluation scored: the one ``model_uri`` names (a version or an
    alias), or the newest registered from ``run_id`` (a finetune_vocoder run's ``model/``); None if unregistered."""
    if model_uri:
        if match := _VERSION_URI.match(model_uri):
            return match.group(1)
        if match := _ALIAS_URI.match(model_uri):
            try:
                return client.get_model_version_by_alias(MODEL_NAME, match.group(1)).version
            except MlflowException:
                return None
        run_id = model_uri.split("/")[1] if model_uri.startswith("runs:/") else None
    if not run_id:
        return None
    try:
        versions = client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'")
    except MlflowException:  # no registry, or no such model yet
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


def describe_version(chain: list[str], evaluation: str, test_set: str, metrics: dict[str, float]) -> str:
    """The version's Markdown description: its runs and steps (``chain``), then its evaluation."""
    lines = [
        "Restoration chain:",
        *[f"- {item}" for item in chain],
        "",
        f"Evaluated by run `{evaluation}` on {test_set}.",
    ]
    if sentence := verdict(metrics):
        lines += ["", sentence]
    return "\n".join([*lines, "", *markdown_table(metrics)])


def record_evaluation(
    client: MlflowClient, version: str, metrics: dict[str, float], evaluation_run: str, test_set: str, chain: list[str]
) -> str:
    """Describe and tag ``version`` with its evaluation, then move ``@champion`` if it is better; what happened
    to the alias, as a sentence for the log."""
    tags = {EVAL_RUN_TAG: evaluation_run, TEST_SET_TAG: test_set}
    for metric in HEADLINE:
        value = metrics.get(f"eval/restored/{metric}")
        if value is not None and math.isfinite(value):
            # exact (the shortest text that reads back as the same float): @champion compares against it, and a
            # value rounded down for display would let the same chain, scored again, look higher than itself
            tags[SCORE_TAG.format(metric=metric)] = repr(float(value))
    for key, value in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, key, value)
    client.update_model_version(
        MODEL_NAME, version, description=describe_version(chain, evaluation_run, test_set, metrics)
    )
    return move_champion(client, version, metrics.get(f"eval/restored/{PRIMARY}"), test_set)


def move_champion(client: MlflowClient, version: str, score: float | None, test_set: str) -> str:
    """Point ``@champion`` at ``version`` when there is no champion yet, or when ``score`` (restored STOI) beats
    the champion's on the same test set."""
    here = f"models:/{MODEL_NAME}/{version}"
    if score is None or not math.isfinite(score):
        return f"{here} has no restored {PRIMARY} score; @{CHAMPION} is unchanged"
    try:
        current = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and current.version == version:
        return f"{here} stays @{CHAMPION} (restored {PRIMARY} {score:.3f})"
    if current is not None:
        if current.tags.get(TEST_SET_TAG) != test_set:
            return (
                f"{here} is not compared with @{CHAMPION} (version {current.version}): that one was scored on "
                f"another test set ({current.tags.get(TEST_SET_TAG, 'none recorded')})"
            )
        try:
            best = float(current.tags.get(SCORE_TAG.format(metric=PRIMARY), "nan"))
        except ValueError:
            best = math.nan
        if math.isfinite(best) and score <= best:
            return (
                f"{here} scores restored {PRIMARY} {score:.3f}, not above @{CHAMPION} (version {current.version}, "
                f"{best:.3f}); @{CHAMPION} is unchanged"
            )
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    before = f" (was version {current.version})" if current is not None else ""
    return f"{here} is now @{CHAMPION}{before}: restored {PRIMARY} {score:.3f}"
