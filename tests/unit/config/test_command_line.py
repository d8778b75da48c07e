"""The one command-line grammar (README, "Command lines"): every entry point sorts its words with
``pipeline.config.parse_command_line``. Cheap: only parsing, no run."""

import pytest

from pipeline.config import CommandLine, ConfigError, parse_command_line, parse_key_values, split_overrides


def test_a_word_of_several_overrides_is_split_with_shell_rules_and_one_value_with_spaces_is_kept():
    assert split_overrides(["ssl=tiny trainer.max_steps=5 tracking.run_name='my run'", "batch_size=2"]) == [
        "ssl=tiny",
        "trainer.max_steps=5",
        "tracking.run_name=my run",
        "batch_size=2",
    ]
    assert split_overrides(["input=/data/my recordings"], ("input",)) == ["input=/data/my recordings"]
    assert split_overrides(["batch_size=3 0"], ("input",)) == ["batch_size=3", "0"]  # an override: always split
    assert split_overrides(["", "  "]) == []  # an MLproject parameter left empty
    with pytest.raises(ConfigError, match="Malformed override"):
        split_overrides(["a='unterminated"])


def test_launch_arguments_are_sorted_from_overrides_and_empty_ones_are_not_given():
    line = parse_command_line(
        [
            "resume_run=",
            "checkpoint.resume_from=runs:/x/checkpoints/step-2",
            "adapter_run=a1 optim.lr=1e-4",
            "ssl=tiny",
        ],
        ("resume_run", "resume_from", "adapter_run"),
        {"checkpoint.resume_from": "resume_from"},
    )
    assert line == CommandLine(
        launch={"resume_from": "runs:/x/checkpoints/step-2", "adapter_run": "a1"},
        overrides=["optim.lr=1e-4", "ssl=tiny"],
    )


def test_key_value_entry_points_type_their_arguments_and_refuse_unknown_keys():
    from pipeline.restore import RestoreConfig

    cfg = parse_key_values(
        RestoreConfig,
        ["run_id=abc", "model_uri=", "input=/my dir/a.wav", "output=out", "overwrite=true chunk_seconds=0"],
    )
    assert (cfg.run_id, cfg.model_uri, cfg.input, cfg.overwrite, cfg.chunk_seconds) == (
        "abc",
        None,
        "/my dir/a.wav",
        True,
        0.0,
    )
    with pytest.raises(ConfigError, match="Key 'inptu' not in"):
        parse_key_values(RestoreConfig, ["inptu=x"])
    with pytest.raises(ConfigError, match="Expected key=value arguments"):
        parse_key_values(RestoreConfig, ["input"])
    with pytest.raises(ConfigError, match="Invalid argument"):
        parse_key_values(RestoreConfig, ["chunk_seconds=long"])


def test_every_entry_point_reads_the_same_grammar():
    from pipeline.evaluate import parse_args as evaluate_args
    from pipeline.sweep import parse_args as sweep_args
    from pipeline.transcribe import parse_args as transcribe_args

    # evaluate: the MLproject's overrides parameter is one word
    cfg = evaluate_args(["run_id=r1", "model_uri=", "asr_run=", "noisy_dir=", "data=demo test_size=2 seed=7"])
    assert (cfg.run_id, cfg.test_size, cfg.seed, cfg.asr_run) == ("r1", 2, 7, None)
    assert transcribe_args(["run_id=r1", "input=/a b.wav", "output="]).input == "/a b.wav"
    args = sweep_args(
        ["stage=train_adapter", "n_trials=3", "storage=", "study=", "ssl=tiny sweep.pruner=none adapter_run="]
    )
    assert (args.stage, args.n_trials, args.storage, args.study) == (
        "train_adapter",
        3,
        "sqlite:///optuna.db",
        "train_adapter-sweep",
    )
    assert args.spec_overrides == ["pruner=none"] and args.stage_overrides == ["ssl=tiny", "adapter_run="]
    with pytest.raises(ConfigError, match="n_trials must be a number"):
        sweep_args(["n_trials=many"])


def test_import_checkpoint_takes_its_files_as_launch_arguments_and_routes_the_rest():
    from pipeline.import_checkpoint import parse_args

    launch, overrides = parse_args(["adapter=/ckpt/a b.ckpt", "vocoder=", "batch_size=2 train_adapter.seed=3"])
    assert launch == {"adapter": "/ckpt/a b.ckpt"}
    assert overrides == {"train_adapter": ["batch_size=2", "seed=3"], "finetune_vocoder": ["batch_size=2"]}
    with pytest.raises(ConfigError, match="import_checkpoint needs adapter="):
        parse_args(["vocoder=/v.ckpt"])
