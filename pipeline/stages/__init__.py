"""One module per training stage: compose config, build parts, hand them to the engine.

``TRAINING_STAGES`` is the list of training stages, read by everything that maps a stage name to its
class (the sweep; the tests that check each stage has its config, shim and MLproject entry point).
Adding a stage: its module here, its entry in ``TRAINING_STAGES``, ``configs/<stage>.yaml`` with a
schema in ``pipeline/config.py``, ``pipeline/<stage>.py`` (the ``python -m`` shim) and ``MLproject``
(docs/architecture.md, "Adding a training stage").
"""

from __future__ import annotations

import importlib

# name -> "module:Class", imported on demand so that a job loads only its own stage's code
TRAINING_STAGES = {
    "train_adapter": "pipeline.stages.train_adapter:TrainAdapter",
    "pretrain_vocoder": "pipeline.stages.pretrain_vocoder:PretrainVocoder",
    "finetune_vocoder": "pipeline.stages.finetune_vocoder:FinetuneVocoder",
    "train_asr": "pipeline.stages.train_asr:TrainAsr",
}


def stage_class(name: str) -> type:
    """The Stage subclass registered as ``name``; KeyError for an unknown name."""
    module, _, cls = TRAINING_STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
