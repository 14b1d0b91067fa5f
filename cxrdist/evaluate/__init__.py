"""`cxrdist eval` and `cxrdist predict`: scores a reviewer accepts, and the model's calls on files.

- ``record``: predictions.csv (the contract) and metrics.json computed from it (pure; bootstrap intervals
  over patients, operating points and temperature fitted on val, calibration, subgroups).
- ``run``: a run's checkpoint over its shards -> ``RUN/eval/<split>/`` and ``RUN/operating_points.json``.
- ``render`` / ``plots``: report.md, the terminal table, ROC / PR / reliability / subgroup figures.
- ``predict``: files -> calibrated probabilities and calls at the operating points; ``cam``: Grad-CAM.
"""

from cxrdist.evaluate.predict import predict_files
from cxrdist.evaluate.run import evaluate_run, label_pairs, load_checkpoint, model_from_checkpoint

__all__ = ["evaluate_run", "label_pairs", "load_checkpoint", "model_from_checkpoint", "predict_files"]
