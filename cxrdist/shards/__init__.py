"""WebDataset shards: packing (pack.py), the manifest (manifest.py) and verification (verify.py)."""

from __future__ import annotations

from cxrdist.shards.manifest import ManifestError, load_manifest, shard_paths, split_samples

__all__ = ["ManifestError", "load_manifest", "shard_paths", "split_samples"]
