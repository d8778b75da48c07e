"""Entry point: ``python -m pipeline.train_adapter key=value ...`` (see pipeline.stages.train_adapter)."""

from pipeline.engine.session import main
from pipeline.stages.train_adapter import TrainAdapter

if __name__ == "__main__":
    main(TrainAdapter)
