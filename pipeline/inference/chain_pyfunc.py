"""The code MLflow runs to load a speech-restoration model (models from code: no pickled object).

``pipeline.inference.chain.save_chain_model`` names this file as the model's ``python_model``; MLflow copies
it into the model directory and executes it on ``mlflow.pyfunc.load_model``.
"""

import mlflow

from pipeline.inference.chain import ChainModel

mlflow.models.set_model(ChainModel())
