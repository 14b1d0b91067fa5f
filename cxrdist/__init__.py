"""cxrdist: multi-label chest X-ray classification, from credentialed datasets to distributed training."""

from cxrdist.cpus import apply_wait_policy as _apply_wait_policy

# OpenMP's wait policy is read when torch loads libgomp: choose it from this process's rank layout now
# (spinning when a rank's threads own their cores, passive when they share them). See cxrdist/cpus.py.
_apply_wait_policy()

__version__ = "0.1.0"
