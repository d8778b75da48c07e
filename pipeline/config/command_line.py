"""The one command-line grammar of every entry point (README, "Command lines").

A command line is a list of ``key=value`` words. The keys an entry point declares are its launch arguments
(``resume_run=``, ``adapter_run=``, restore's ``input=``, the sweep's ``n_trials=``, ...); every other word is
a config override in Hydra's syntax (``trainer.max_steps=200``, ``ssl=tiny``, ``+tracking.tags.team=asr``).

- ``mlflow run`` hands its ``overrides`` parameter over as one word (``"a=1 b=2"``): a word is split with
  shell rules, so ``'...'`` quotes a value with spaces inside it. A word that is one launch argument whose
  value holds spaces (``input=/my recordings``, what ``-P input=...`` hands over) is taken as given; an
  override is always split (``"batch_size=3 0"`` is two words, as the shell would make them).
- An empty launch argument (``resume_run=``: an MLproject parameter left out) means "not given".
- A word with unbalanced quotes is refused (``Malformed override``), unless it is one launch argument (a path with
  an apostrophe: ``input=it's.wav``); so is, by the entry point, a key it
  does not know (restore's ``inptu=x``) or a malformed override (``trainer.max_steps=[1,``).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from pipeline.config.compose import ConfigError, GrammarError


@dataclass(frozen=True)
class CommandLine:
    """An entry point's words, sorted."""

    launch: dict[str, str] = field(default_factory=dict)  # launch arguments given, by name (empty ones left out)
    overrides: list[str] = field(default_factory=list)  # every other word, in the order given


def split_overrides(args: list[str] | tuple[str, ...], launch_keys: tuple[str, ...] = ()) -> list[str]:
    """Command-line words as single ``key=value`` words: each word is split with shell rules (``mlflow run``
    passes the ``overrides`` parameter as one word), except one ``<launch key>=value`` whose value holds
    spaces and no other ``key=value``, or an unbalanced quote (a path given as its own MLproject parameter)."""
    out: list[str] = []
    for arg in args:
        key = arg.partition("=")[0].strip()
        try:
            words = shlex.split(arg)
        except ValueError as err:
            if key in launch_keys:  # a path with an apostrophe, as `-P input=it's.wav` hands it over
                out.append(arg)
                continue
            raise GrammarError(f"Malformed override {arg!r}: {err}") from err
        one_value_with_spaces = (
            len(words) > 1 and key in launch_keys and "=" in words[0] and not any("=" in w for w in words[1:])
        )
        out.extend([arg] if one_value_with_spaces else words)
    return out


def parse_command_line(
    argv: list[str] | tuple[str, ...], launch_keys: tuple[str, ...] = (), aliases: dict[str, str] | None = None
) -> CommandLine:
    """Sort the words: those whose key is in ``launch_keys`` (or an alias of one, spelt as ``aliases`` maps it)
    are launch arguments, the others overrides. Raises ConfigError for unbalanced quotes."""
    launch: dict[str, str] = {}
    overrides: list[str] = []
    for word in split_overrides(argv, launch_keys):
        key, sep, value = word.partition("=")
        key = (aliases or {}).get(key, key)
        if not sep or key not in launch_keys:
            overrides.append(word)
        elif value:
            launch[key] = value
    return CommandLine(launch, overrides)


def parse_key_values(schema: type, argv: list[str]):
    """The words of an entry point whose every argument is a launch argument (transcribe, restore, evaluate):
    an instance of the dataclass ``schema`` whose fields are the keys. An empty value means "not given"; an
    unknown key or a wrong type fails with ConfigError."""
    line = parse_command_line(argv, tuple(f.name for f in dataclasses.fields(schema)))
    unknown = [w for w in line.overrides if not w.endswith("=")]
    if any("=" not in w for w in unknown):
        raise GrammarError(f"Expected key=value arguments, got: {' '.join(unknown)}")
    words = [f"{key}={value}" for key, value in line.launch.items()] + unknown
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(words))
    except Exception as err:
        raise ConfigError(f"Invalid argument: {str(err).splitlines()[0]}") from err
    return OmegaConf.to_object(cfg)  # the dataclass, with its nested ones (clean_corpus's keep.*)
