"""Property tests (Hypothesis): override parsing, checkpoint retention, the resume resolver and the data position.

Every test runs with ``database=None``: Hypothesis keeps no example database (its ``.hypothesis/`` cache folder
ignores itself in git); the failures a test found once are pinned with ``@example`` instead.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import json
import logging
import math
import random
import re
import shlex
import shutil
import tempfile
import typing
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, artifact_dir
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.common.files import sha256_file
from pipeline.config import (
    CONFIG_DIR,
    ConfigError,
    apply_overrides,
    compose_config,
    config_diff,
    from_container,
    to_container,
)
from pipeline.data.datasets import epoch_batches
from pipeline.engine import checkpointing
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_name,
    write_local,
)
from pipeline.engine.checkpointing import (
    CHECKPOINT_DIR,
    CheckpointStore,
    RetentionPolicy,
    list_checkpoints,
    read_index,
    steps_to_keep,
)
from pipeline.engine.launch import parse_launch
from pipeline.engine.resume import ResumeError, RunCheckpoints
from pipeline.engine.stage import Precision
from pipeline.engine.trainer import Engine
from pipeline.launcher import parse
from pipeline.stages.train_adapter import TrainAdapterConfig

log = logging.getLogger(__name__)

STAGE = "train_adapter"
# Each example composes a config with Hydra (~0.2 s) or builds a tracking store: few examples, no deadline.
FAST = settings(max_examples=15, deadline=None, database=None)
# Tests that use the function-scoped `store` fixture: every example makes its own run in that store.
IN_STORE = settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ============================================================================================
# 1. Override parsing
# ============================================================================================


def _scalar_keys(schema: type, prefix: str = "") -> list[tuple[str, type, bool]]:
    """(dotted key, int | float | bool | str, optional) of every scalar field of a config schema."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = True, args[0] if len(args) == 1 else hint
        if dataclasses.is_dataclass(hint):
            out += _scalar_keys(hint, f"{prefix}{f.name}.")
        elif hint in (int, float, bool, str):
            out.append((f"{prefix}{f.name}", hint, optional))
    return out


SCALAR_KEYS = _scalar_keys(TrainAdapterConfig)
KEY_TYPES = {key: (kind, optional) for key, kind, optional in SCALAR_KEYS}
NODES = sorted({key.rpartition(".")[0] for key in KEY_TYPES})  # "" is the top level
GROUPS = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}  # what a bool field takes as text


@lru_cache(maxsize=1)
def default_config():
    return compose_config(STAGE, [])


@lru_cache(maxsize=1)
def _entry_point():
    from mlflow.projects._project_spec import load_project

    return load_project(str(REPO)).get_entry_point(STAGE)


def as_mlflow_passes(words: list[str]) -> list[str]:
    """The stage's argv when a user gives ``words`` as the ``overrides`` parameter of ``mlflow run``: one
    parameter string, each word shell-quoted; MLflow quotes the parameter into the entry point's command,
    which the shell splits."""
    param = " ".join(shlex.quote(word) for word in words)
    command = _entry_point().compute_command({"overrides": param}, tempfile.gettempdir())
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pipeline.launcher"], command
    stage, nproc, torchrun, args = parse(argv[3:])  # the launcher then runs python -m pipeline.stages.<stage> <args>
    assert (stage, nproc, torchrun) == (STAGE, 1, ""), command
    return args


def hydra_quote(text: str) -> str:
    """``text`` as a quoted Hydra value: a quote and ``${`` are escaped, and a run of backslashes before either
    (or before the closing quote) is doubled, per Hydra's override grammar."""

    def escape(m: re.Match) -> str:
        backslashes, what = m.group(1), m.group(2)
        return backslashes * 2 + {"'": "\\'", "${": "\\${", "": ""}[what]

    return "'" + re.sub(r"(\\*)('|\$\{|$)", escape, text) + "'"


SPECIAL = " ='\"\\${}[](),:#!*?~+-%@|&;<>/\t\n"
strings = st.text(
    st.one_of(st.sampled_from(SPECIAL), st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    max_size=12,
)
plain_words = st.from_regex(r"[A-Za-z_][A-Za-z0-9_/-]{0,10}", fullmatch=True).filter(
    lambda w: w.lower() not in {"true", "false", "null", "nan", "inf"}
)  # what Hydra would type


def _bool_text(value: bool) -> st.SearchStrategy[str]:
    word = "true" if value else "false"
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(word, upper))
    )


@st.composite
def valid_value(draw, key: str) -> tuple[str, object]:
    """(the text a user writes after ``key=``, the value the config must then hold)."""
    kind, optional = KEY_TYPES[key]
    if optional and draw(st.integers(0, 5)) == 0:
        return "null", None
    if kind is bool:
        value = draw(st.booleans())
        return draw(_bool_text(value)), value
    if kind is int:
        value = draw(st.integers(-(2**63), 2**63 - 1))
        return str(value), value
    if kind is float:
        value = draw(st.one_of(st.floats(), st.integers(-(10**6), 10**6).map(float)))
        if not math.isfinite(value):
            return str(value), value  # inf, -inf, nan
        return draw(st.sampled_from([repr(value), str(int(value))] if value.is_integer() else [repr(value)])), value
    value = draw(st.one_of(plain_words, strings))
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_/-]*", value) and value.lower() not in {
        "true",
        "false",
        "null",
        "nan",
        "inf",
    }:
        return draw(st.sampled_from([value, hydra_quote(value)])), value
    return hydra_quote(value), value


@st.composite
def valid_overrides(draw, max_size: int = 4) -> list[tuple[str, str, object]]:
    """Overrides of distinct existing keys: (key, text after '=', expected value)."""
    keys = draw(st.lists(st.sampled_from(sorted(KEY_TYPES)), min_size=1, max_size=max_size, unique=True))
    return [(key, *draw(valid_value(key))) for key in keys]


def same_value(actual, expected) -> bool:
    if expected is None:
        return actual is None
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return type(actual) is type(expected) and actual == expected


def check_values(cfg, overrides) -> None:
    for key, text, expected in overrides:
        actual = OmegaConf.select(cfg, key)
        assert same_value(actual, expected), f"{key}={text}: config holds {actual!r}, expected {expected!r}"


@FAST
@given(valid_overrides(max_size=10))
def test_valid_overrides_passed_through_mlflow_compose_to_exactly_their_values(overrides):
    """Overrides of existing keys with values of the key's type, quoted as a user quotes them for ``mlflow run``,
    reach the stage as the same words and compose (fresh start) and apply (resume) to exactly those values."""
    words = [f"{key}={text}" for key, text, _ in overrides]
    launch = parse_launch(as_mlflow_passes(words))
    assert launch.overrides == words and not launch.resuming
    check_values(compose_config(STAGE, launch.overrides), overrides)
    check_values(apply_overrides(STAGE, default_config(), launch.overrides), overrides)


def refusals(words: list[str]) -> tuple[ConfigError, ConfigError]:
    """The errors of composing ``words`` (fresh start) and of applying them to a stored config (resume); any
    other outcome fails the test."""
    with pytest.raises(ConfigError) as fresh:
        compose_config(STAGE, words)
    with pytest.raises(ConfigError) as resumed:
        apply_overrides(STAGE, default_config(), words)
    return fresh.value, resumed.value


@st.composite
def wrong_value(draw, key: str) -> str:
    """Text after ``key=`` that the key's type refuses."""
    kind, optional = KEY_TYPES[key]
    containers = st.sampled_from(["[1,2]", "[]", "{a:1}", "{}"])
    if kind is str:
        return draw(containers)
    word = plain_words.filter(lambda w: not _parses_as(kind, w))
    choices = [containers, word, word.map(hydra_quote)]
    if kind is int:
        choices.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not v.is_integer()).map(repr))
        choices.append(st.sampled_from(["true", "false", "1.0"]))
    if kind is float:
        choices.append(st.sampled_from(["true", "False"]))
    if kind is bool:
        choices.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v not in (0, 1)).map(repr))
    if not optional:
        choices.append(st.just("null"))
    return draw(st.one_of(*choices))


def _parses_as(kind: type, word: str) -> bool:
    if kind is bool:
        return word.lower() in BOOL_WORDS
    try:
        kind(word)
    except ValueError:
        return False
    return True


@FAST
@given(st.data())
def test_a_wrong_typed_value_is_a_config_error_naming_its_key(data):
    """A value of the wrong type for a typed key, among valid overrides, fails (fresh start and resume) with a
    ConfigError whose message names that key."""
    overrides = [f"{k}={t}" for k, t, _ in data.draw(valid_overrides(max_size=3))]
    bad_key = data.draw(st.sampled_from(sorted(KEY_TYPES)))
    bad = f"{bad_key}={data.draw(wrong_value(bad_key))}"
    words = [w for w in overrides if not w.startswith(f"{bad_key}=")]
    words.insert(data.draw(st.integers(0, len(words))), bad)
    words = parse_launch(as_mlflow_passes(words)).overrides
    assert all(bad_key in str(err) for err in refusals(words))


identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)


@st.composite
def unknown_key(draw) -> str:
    node = draw(st.sampled_from(NODES))
    name = draw(identifiers)
    key = f"{node}.{name}" if node else name
    assume(OmegaConf.select(default_config(), key, default="<absent>") == "<absent>")
    assume(node or name not in GROUPS | {"hydra"})  # a config group (or Hydra's own node), not a key
    return key


@settings(FAST, max_examples=10)
@given(unknown_key(), st.sampled_from(["1", "0.5", "true", "x", "'a b'"]))
def test_an_unknown_key_is_a_config_error_naming_it(key, value):
    """An override of a key the schema does not have fails (fresh start and resume) with a ConfigError whose
    message names the key."""
    words = parse_launch(as_mlflow_passes([f"{key}={value}"])).overrides
    assert all(key in str(err) for err in refusals(words))


malformed_words = st.text(
    st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="="), min_size=1, max_size=15
).filter(lambda w: w.strip() and w.strip()[0] not in "~+")


OTHERS = st.lists(st.sampled_from(["batch_size=3", "ssl=tiny", "tracking.run_name='a b'"]), max_size=2)


@settings(max_examples=30, deadline=None, database=None)
@given(malformed_words, OTHERS)
def test_a_word_without_an_equals_sign_is_a_config_error(word, others):
    """A word with no '=' (and no Hydra add/delete prefix), among valid overrides, reaches the stage intact and
    fails with a ConfigError (fresh start and resume), never another exception."""
    words = parse_launch(as_mlflow_passes([*others, word])).overrides
    assert words[-1] == word
    refusals(words)


@settings(max_examples=30, deadline=None, database=None)
@example(word="@:", others=[])
@given(malformed_words, OTHERS)
def test_the_error_for_a_word_without_an_equals_sign_quotes_the_word(word, others):
    """The ConfigError for a word with no '=' quotes that word, so the user sees which one to fix."""
    for err in refusals([*others, word]):
        assert word in str(err)


def reads_back(cfg):
    """The config as a resume reads it: stored in meta.json (to_container, JSON), rebuilt by from_container."""
    stored = json.loads(json.dumps(to_container(cfg), default=str))
    return from_container(TrainAdapterConfig, stored)


@FAST
@example(prefix="+", key="foo", value="1")
@example(prefix="~", key="batch_size", value="")
@given(
    st.sampled_from(["+", "++", "~"]),
    st.one_of(st.sampled_from(sorted(KEY_TYPES)), unknown_key()),
    st.sampled_from(["", "1", "true", "'x'"]),
)
def test_an_accepted_add_or_delete_override_keeps_the_config_in_its_schema(prefix, key, value):
    """An add (``+key=v``, ``++key=v``) or delete (``~key``) override is either a ConfigError naming the key or
    leaves a config that a resume reads back unchanged from its checkpoint (the schema's keys, nothing else)."""
    word = f"{prefix}{key}" + (f"={value}" if value or prefix != "~" else "")
    try:
        cfg = compose_config(STAGE, [word])
    except ConfigError as err:
        assert key in str(err)
        return
    assert config_diff(cfg, reads_back(cfg)) == {}, word


@FAST
@example([("tracking.run_name", hydra_quote("cost ${x}"), "cost ${x}")])
@example([("adapter.bottleneck", "0", 0), ("adapter.init_gain", "nan", math.nan)])  # NaN read as changed (CI)
@given(valid_overrides())
def test_a_composed_config_reads_back_from_its_checkpoint_unchanged(overrides):
    """A config composed from valid overrides, stored in a checkpoint's meta.json and rebuilt on resume, holds the
    same values."""
    cfg = compose_config(STAGE, [f"{key}={text}" for key, text, _ in overrides])
    back = reads_back(cfg)
    check_values(back, overrides)
    assert config_diff(cfg, back) == {}


# ============================================================================================
# 2. Retention
# ============================================================================================

MONITOR = "val/loss"
monitored = st.one_of(
    st.floats(),  # NaN and +-inf included
    st.sampled_from([0.0, -0.0, 1.0, 0.5]),  # ties
    st.none(),
    st.floats().map(repr),  # as read back from index.csv
    st.sampled_from(["", "nan", "inf", "-inf", "ten", "0.5", " 1e3 "]),
)
policies = st.builds(
    RetentionPolicy,
    keep_last_n=st.integers(0, 6),
    keep_best_k=st.integers(0, 6),
    monitor=st.just(MONITOR),
    mode=st.sampled_from(["min", "max"]),
)
MISSING = object()


@st.composite
def index_rows(draw):
    steps = draw(st.lists(st.integers(0, 10_000), max_size=12, unique=True))
    rows = []
    for step in steps:
        row = {"name": checkpoint_name(step), "step": draw(st.sampled_from([step, str(step)]))}
        value = draw(st.one_of(st.just(MISSING), monitored))
        if value is not MISSING:
            row[MONITOR] = value
        rows.append(row)
    return rows


def score(row) -> float | None:
    """The monitored value when it is a finite number, else None (missing, unparsable, NaN, inf)."""
    try:
        value = float(row.get(MONITOR))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_kept(rows, policy: RetentionPolicy, latest: int, keep: set[int]) -> None:
    steps = sorted(int(r["step"]) for r in rows)
    assert latest in keep
    assert keep <= set(steps) | {latest}
    last_n = set(steps[-policy.keep_last_n :]) if policy.keep_last_n > 0 else set()
    assert last_n <= keep
    scored = {int(r["step"]): score(r) for r in rows if score(r) is not None}
    better = (lambda a, b: a < b) if policy.mode == "min" else (lambda a, b: a > b)
    ranked = sorted(scored.values(), reverse=policy.mode == "max")
    k = min(policy.keep_best_k, len(ranked))
    if k:
        kth = ranked[k - 1]
        # every value strictly better than the K-th best is kept, and at least K of those at least as good
        assert {s for s, v in scored.items() if better(v, kth)} <= keep
        assert len({s for s, v in scored.items() if not better(kth, v)} & keep) >= k
    extra = keep - last_n - {latest}  # kept for their score only
    assert len(extra) <= policy.keep_best_k
    for step in extra:
        assert step in scored, f"step {step} kept for a missing or non-finite {MONITOR}"
        dropped_better = [s for s, v in scored.items() if s not in keep and better(v, scored[step])]
        assert not dropped_better, f"kept {step} ({scored[step]}) but dropped better {dropped_better}"


@settings(max_examples=300, deadline=None, database=None)
@given(index_rows(), policies, st.data())
def test_retention_keeps_the_latest_the_last_n_and_the_best_k_finite(rows, policy, data):
    """steps_to_keep keeps the latest step, the last N steps and the best K finite values (at least K of the
    best under ties), never prefers a missing or non-finite value to a finite one, and returns no other step."""
    steps = [int(r["step"]) for r in rows]
    latest = data.draw(st.sampled_from(steps) if steps and data.draw(st.booleans()) else st.integers(0, 10_000))
    check_kept(rows, policy, latest, steps_to_keep(rows, policy, latest))


def upload_checkpoints(client: MlflowClient, run_id: str, staging: Path, steps: list[int]) -> None:
    """Small real checkpoints (write_local) in the run's artifacts, as uploads leave them."""
    shutil.rmtree(staging, ignore_errors=True)
    for step in steps:
        write_local(
            staging,
            step,
            {"w": torch.full((2,), float(step))},
            {"format_version": 1, "stage": "toy", "step": step, "config": {}},
        )
    client.log_artifacts(run_id, str(staging), CHECKPOINT_DIR)


@st.composite
def stored_history(draw):
    """(stored steps, index rows of some of them and maybe of steps no longer stored, the latest committed)."""
    stored = draw(st.lists(st.integers(0, 500), min_size=1, max_size=7, unique=True))
    latest = draw(st.sampled_from(stored))
    indexed = {latest} | set(draw(st.lists(st.sampled_from(stored), min_size=len(stored) // 2, unique=True)))
    indexed |= set(draw(st.lists(st.integers(501, 600), max_size=2, unique=True)))  # removed by hand
    rows = []
    for step in sorted(indexed):
        value = draw(st.one_of(st.just(MISSING), monitored))
        rows.append({"name": checkpoint_name(step), "step": step, **({} if value is MISSING else {MONITOR: value})})
    return sorted(stored), rows, latest


def unreachable(*args, **kwargs):
    raise OSError("artifact store unreachable")


@IN_STORE
@given(stored_history(), policies, st.sampled_from([None, None, None, None, "listing", "index"]))
def test_retention_in_a_real_store_deletes_only_indexed_unkept_checkpoints(store, history, policy, failure):
    """CheckpointStore._apply_retention deletes exactly the indexed checkpoints up to the latest that the policy,
    ranking only the stored ones, does not keep: never one without an index row, never the latest; when the store
    cannot be read (listing the checkpoints, reading index.csv) nothing is deleted and the failure is raised, not
    read as an empty index."""
    stored, rows, latest = history
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    upload_checkpoints(client, run_id, store / "upload", stored)
    checkpoints = CheckpointStore(client, run_id, store / "staging", policy, index_rows=rows)
    try:
        checkpoints._write_index()
        assert sorted(int(r["step"]) for r in read_index(client, run_id)) == sorted(int(r["step"]) for r in rows)
        if failure == "listing":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(checkpoints.repo, "list_artifacts", unreachable)
                try:
                    checkpoints._apply_retention(latest)
                    raised = False
                except OSError:
                    raised = True
            must_list = bool({int(r["step"]) for r in rows} - steps_to_keep(rows, policy, latest))
            assert raised or not must_list  # a listing that fails is not read as "nothing stored"
            assert list_checkpoints(client, run_id) == stored
            return
        if failure == "index":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(MlflowClient, "download_artifacts", unreachable)
                mp.setattr(checkpointing.time, "sleep", lambda s: None)
                with pytest.raises(CheckpointError, match="nothing was changed"):
                    read_index(client, run_id)
            assert list_checkpoints(client, run_id) == stored
            return
        checkpoints._apply_retention(latest)
    finally:
        checkpoints.close()
    # only what the store holds is ranked: a row of a step not stored never pushes a stored one out of the best K
    ranked = [r for r in rows if int(r["step"]) in set(stored)]
    keep = steps_to_keep(ranked, policy, latest)
    indexed = {int(r["step"]) for r in ranked}
    remaining = set(list_checkpoints(client, run_id))
    deleted = set(stored) - remaining
    event(
        f"deleted {min(len(deleted), 2)}{'+' if len(deleted) >= 2 else ''}, kept unindexed {len(set(stored) - indexed)}"
    )
    assert latest in remaining
    assert set(stored) - indexed <= remaining, "deleted a checkpoint the index does not know"
    assert deleted == {s for s in set(stored) & indexed if s not in keep and s <= latest}
    assert {int(r["step"]) for r in checkpoints.index_rows} == indexed & keep


# ============================================================================================
# 3. The resume resolver
# ============================================================================================

DAMAGE = ("ok", "ok", "bitflip", "truncated", "no_state", "no_meta", "bad_meta", "foreign", "deleted")


def tiny_state(step: int) -> dict:
    """A state.pt with the parts Engine.state_dict gives, tiny."""
    return {
        "step": step,
        "epoch": 0,
        "batch_in_epoch": step,
        "modules": {"net": {"w": torch.full((3,), float(step))}},
        "optimizers": {},
        "schedulers": {},
        "rng": {},
    }


def damage(ckpt: Path, how: str, where: float) -> None:
    """Leave a stored checkpoint ``how``: corrupted, cut short, partially uploaded, not the pipeline's, or gone."""
    state = ckpt / STATE_FILE
    if how == "bitflip":
        data = bytearray(state.read_bytes())
        bit = int(where * (len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
        state.write_bytes(bytes(data))
    elif how == "truncated":
        data = state.read_bytes()
        state.write_bytes(data[: int(where * (len(data) - 1))])
    elif how == "no_state":
        state.unlink()
    elif how == "no_meta":
        (ckpt / META_FILE).unlink()
    elif how == "bad_meta":
        (ckpt / META_FILE).write_bytes(b"{\xff not json")
    elif how == "foreign":  # another step's state, with meta.json's sha256 made to match it
        torch.save(tiny_state(int(where * 1000) + 1000), state)
        meta = json.loads((ckpt / META_FILE).read_text())
        meta.update(sha256=sha256_file(state), size=state.stat().st_size)
        (ckpt / META_FILE).write_text(json.dumps(meta))
    elif how == "deleted":
        shutil.rmtree(ckpt)


@st.composite
def resume_cases(draw):
    steps = draw(st.lists(st.integers(0, 60), min_size=1, max_size=5, unique=True).map(sorted))
    fates = {s: draw(st.sampled_from(DAMAGE)) for s in steps}
    wheres = {s: draw(st.floats(0, 1)) for s in steps}
    latest = draw(st.sampled_from(steps))
    explicit = draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(steps), st.integers(0, 70)))
    return steps, fates, wheres, latest, explicit


@IN_STORE
@example(case=([2, 4, 6, 8], {2: "ok", 4: "no_state", 6: "bitflip", 8: "ok"}, {2: 0, 4: 0, 6: 0.5, 8: 0}, 6, None))
@example(case=([3, 5], {3: "foreign", 5: "ok"}, {3: 0.2, 5: 0}, 3, None))
@given(resume_cases())
def test_resume_loads_the_newest_verified_committed_checkpoint_or_refuses(store, case):
    """RunCheckpoints.load returns the newest checkpoint that verifies at or below the latest committed step (or
    the explicit step, exactly, when it verifies), with that checkpoint's own state; when none does it raises
    ResumeError with a message, never another exception, and never returns an unverified checkpoint."""
    steps, fates, wheres, latest, explicit = case
    client = MlflowClient()
    run_id = client.create_run("0", tags={tag.STAGE: "toy"}).info.run_id
    checkpoints = CheckpointStore(client, run_id, store / "staging", RetentionPolicy(100, 0, MONITOR, "min"))
    try:
        for step in steps:  # as the engine saves: write, upload, verify the upload, commit, index
            checkpoints.save(
                step,
                tiny_state(step),
                {"format_version": 1, "stage": "toy", "step": step, "config": {"seed": step, "batch_size": 4}},
                {"name": checkpoint_name(step), "step": step},
            )
    finally:
        checkpoints.close()
    root = artifact_dir(client, run_id) / CHECKPOINT_DIR
    written = {s: json.loads((root / checkpoint_name(s) / META_FILE).read_text())["sha256"] for s in steps}
    for step in steps:
        damage(root / checkpoint_name(step), fates[step], wheres[step])
    # the job that committed `latest` was the last to commit: later steps were uploaded, never committed
    client.set_tag(run_id, tag.CHECKPOINT_LATEST, f"{CHECKPOINT_DIR}/{checkpoint_name(latest)}")
    client.set_tag(run_id, tag.CHECKPOINT_LATEST_STEP, str(latest))

    if explicit is None:
        usable = [s for s in steps if s <= latest and fates[s] == "ok"]
        expected = max(usable) if usable else None
    else:
        expected = explicit if fates.get(explicit) == "ok" else None
    newest = max([s for s in steps if s <= latest and fates[s] != "deleted"], default=None)
    event(
        "explicit step"
        if explicit is not None
        else "refused"
        if expected is None
        else "latest"
        if expected == newest
        else "fell back to an older one"
    )
    log.debug(
        "resume case: steps %s, fates %s, latest %s, explicit %s, expected %s", steps, fates, latest, explicit, expected
    )
    workdir = Path(tempfile.mkdtemp(dir=store))
    try:
        point = RunCheckpoints(client, run_id, ("toy",)).load(explicit, workdir)
    except ResumeError as err:
        assert expected is None, f"refused ({err}) although step {expected} verifies"
        assert str(err).strip()
        return
    assert point.step == expected, f"loaded step {point.step}, expected {expected} ({fates}, latest {latest})"
    assert point.meta["step"] == point.step and point.state["step"] == point.step
    assert point.meta["sha256"] == written[point.step]  # the state.pt as written, verified against it
    assert torch.equal(point.state["modules"]["net"]["w"], torch.full((3,), float(point.step)))


# ============================================================================================
# 4. The data position
# ============================================================================================


@lru_cache(maxsize=1)
def toy():
    """tests/unit/engine/test_trainer.py, which holds the toy stage and the in-memory tracking stand-ins (not a
    package: loaded by path under a private name)."""
    spec = importlib.util.spec_from_file_location("_properties_trainer_toy", REPO / "tests/unit/engine/test_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recording_stage(cfg):
    class Recording(toy().Toy):
        """The toy stage, recording every training batch it is given."""

        def training_step(self, batch):
            self.batches.append(batch["x"].clone())
            return super().training_step(batch)

    stage = Recording(cfg, Precision.from_config("cpu", "32"))
    stage.batches = []
    stage.build()
    return stage


class StopAt:
    """A stop request (signal, tag) that arrives while step ``step`` runs."""

    reason = "signal"

    def __init__(self, step: int):
        self.step, self.engine = step, None

    @property
    def requested(self) -> bool:
        return self.engine.pos.step >= self.step


@lru_cache(maxsize=1)
def toy_config():
    return compose_config(STAGE, ["optim.warmup_steps=0", "checkpoint.save_interval=1000", "trainer.log_interval=1000"])


def train(cfg, stop_at: int | None = None, state=None):
    stage, metrics, store = recording_stage(cfg), toy().Metrics(), toy().Store()
    stopper = StopAt(stop_at) if stop_at is not None else toy().NoStop()
    engine = Engine(stage, metrics, store, stopper, run_id="r")
    stopper.engine = engine
    if state is not None:
        torch.manual_seed(random.randrange(2**31)), np.random.seed(random.randrange(2**31)), random.seed()
        engine.load_state_dict(state)
    engine.fit()
    losses = [(step, m["train/loss"]) for step, m in metrics.logged if "train/loss" in m]
    return engine, stage.batches, losses


@lru_cache(maxsize=32)
def uninterrupted(batch_size: int, seed: int, max_steps: int, val_interval: int):
    cfg = copy.deepcopy(toy_config())
    cfg.batch_size, cfg.seed, cfg.trainer.max_steps, cfg.validation.interval = batch_size, seed, max_steps, val_interval
    _, batches, losses = train(cfg)
    return cfg, batches, losses


@settings(max_examples=20, deadline=None, database=None)
@given(st.sampled_from([3, 4, 5, 8]), st.integers(0, 3), st.integers(2, 20), st.sampled_from([0, 3]), st.data())
def test_a_resumed_engine_reads_the_same_batches_as_an_uninterrupted_one(
    batch_size, seed, max_steps, val_interval, data
):
    """An engine stopped at any step s, its state_dict saved (weights_only) and loaded into a fresh engine, trains
    on the same next batches, in the same order and with the same losses, as the engine that never stopped."""
    cfg, batches, losses = uninterrupted(batch_size, seed, max_steps, val_interval)
    stop = data.draw(st.integers(1, max_steps - 1), label="stop step")
    log.debug("batch_size %d, %d steps, stop at %d", batch_size, max_steps, stop)
    stopped, first_batches, _ = train(cfg, stop_at=stop)
    assert stopped.pos.step == stop and all(torch.equal(a, b) for a, b in zip(first_batches, batches))
    buffer = io.BytesIO()
    torch.save(stopped.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, next_batches, next_losses = train(cfg, state=state)
    assert resumed.pos.step == max_steps
    assert len(next_batches) == len(batches) - stop
    for i, (got, want) in enumerate(zip(next_batches, batches[stop:])):
        assert torch.equal(got, want), f"batch of step {stop + 1 + i} differs after a resume from step {stop}"
    assert next_losses == losses[stop:]


@settings(max_examples=100, deadline=None, database=None)
@given(st.integers(1, 200), st.integers(1, 16), st.integers(0, 2**32 - 1), st.integers(0, 50), st.data())
def test_the_batches_of_an_epoch_from_a_position_are_the_rest_of_that_epoch(items, batch_size, seed, epoch, data):
    """epoch_batches from a position k is the epoch's batches from the k-th on; an epoch deals every item at most
    once, in full batches only."""
    full = epoch_batches(items, batch_size, seed, epoch)
    start = data.draw(st.integers(0, len(full)), label="batches done")
    assert epoch_batches(items, batch_size, seed, epoch, start) == full[start:]
    dealt = [key for batch in full for key in batch]
    assert all(len(batch) == batch_size for batch in full) and len(full) == items // batch_size
    assert len(set(dealt)) == len(dealt) and {e for e, _ in dealt} <= {epoch}
    assert {i for _, i in dealt} <= set(range(items))
