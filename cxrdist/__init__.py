"""cxrdist: multi-label chest X-ray classification, from credentialed datasets to distributed training."""
import os as _os

# OpenMP teams that spin while waiting collapse when CPU ranks and loader workers share the cores: on the
# 2-core dev box a DenseNet step took 5-17 s with the default (active) policy vs 0.7-1.4 s passive, with
# other processes running. It must be set before torch loads OpenMP; OMP_WAIT_POLICY=ACTIVE overrides.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
