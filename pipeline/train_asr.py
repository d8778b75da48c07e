"""Entry point: ``python -m pipeline.train_asr key=value ...`` (see pipeline.stages.train_asr)."""

from pipeline.engine.session import main
from pipeline.stages.train_asr import TrainAsr

if __name__ == "__main__":
    main(TrainAsr)
