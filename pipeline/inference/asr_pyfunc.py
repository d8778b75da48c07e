"""The code MLflow runs to load the ``model/`` of a train_asr run (models from code: no pickled object).

``pipeline.transcribe.save_transcriber`` names this file as the model's ``python_model``; MLflow copies
it into the model directory and executes it on ``mlflow.pyfunc.load_model``.
"""

import mlflow

from pipeline.inference.asr import Transcriber

mlflow.models.set_model(Transcriber())
