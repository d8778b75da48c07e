"""Entry point: ``python -m pipeline.pretrain_vocoder key=value ...`` (see pipeline.stages.pretrain_vocoder)."""

from pipeline.engine.session import main
from pipeline.stages.pretrain_vocoder import PretrainVocoder

if __name__ == "__main__":
    main(PretrainVocoder)
