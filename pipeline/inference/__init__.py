"""Using trained models: the restoration chain, speech recognition, MLflow model loaders, scores, listening pages."""
