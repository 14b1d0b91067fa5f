"""single: one process, one device (the reference every speed-up is measured against)."""

from __future__ import annotations

from cxrdist.engine.backends.base import Layout, TorchBackend, register


@register
class SingleBackend(TorchBackend):
    name = "single"
    description = "one process on one device"
    layout = Layout(per_gpu=False, reference=True)
