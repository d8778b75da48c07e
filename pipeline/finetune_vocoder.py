"""Entry point: ``python -m pipeline.finetune_vocoder adapter_run=<id> vocoder_run=<id> key=value ...``
(see pipeline.stages.finetune_vocoder)."""

from pipeline.engine.session import main
from pipeline.stages.finetune_vocoder import FinetuneVocoder

if __name__ == "__main__":
    main(FinetuneVocoder)
