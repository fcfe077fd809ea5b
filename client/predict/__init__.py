"""`medfed predict`: a finished run's global model applied to new studies at a hospital."""

from medfed.client.predict.run import PredictOptions, run_predict

__all__ = ["PredictOptions", "run_predict"]
