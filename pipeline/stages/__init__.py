"""One module per training stage: its config dataclass, its parts, its step; the engine does the rest.

The registry is the files themselves: a training stage ``<name>`` is a module ``pipeline/stages/<name>.py``
beside ``configs/<name>.yaml``. The module defines the stage's config dataclass, registered by
``@stage_config("<name>")``, and a ``Stage`` subclass with ``name = "<name>"`` whose class attributes say
the rest (``schema``, ``run_inputs``: the runs it builds on, ...). Modules without a YAML file of their own
(``vocoder_base``) are shared code. Adding a stage: docs/architecture.md, "Adding a stage".
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

# pipeline.config.CONFIG_DIR, not imported from there: the launcher reads the registry and must not load Hydra
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def training_stages() -> dict[str, str]:
    """name -> module of every training stage (a module of this package with ``configs/<name>.yaml``), by name."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if (CONFIG_DIR / f"{info.name}.yaml").is_file())
    return {name: f"{__name__}.{name}" for name in names}


# name -> module, imported on demand so that a job loads only its own stage's code
TRAINING_STAGES = training_stages()


def stage_class(name: str) -> type:
    """The Stage subclass registered as ``name``; KeyError for an unknown name."""
    from pipeline.engine.stage import Stage

    module = importlib.import_module(training_stages()[name])
    found = [
        obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, Stage) and obj.name == name
    ]
    if len(found) != 1:
        raise KeyError(f"{module.__name__} defines {len(found)} Stage subclasses named {name!r}; it must define one")
    return found[0]
