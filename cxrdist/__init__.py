"""cxrdist: multi-label chest X-ray classification, from credentialed datasets to distributed training."""

__version__ = "0.1.0"
