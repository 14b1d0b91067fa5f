"""The training backends: one module each, found through the registry in ``base``.

Adding a backend is one module here (a ``Backend`` subclass with ``@register``) plus its import below;
nothing else in cxrdist names it.
"""

# registration order is the order reports and help list them in
from cxrdist.engine.backends import single  # noqa: F401, I001
from cxrdist.engine.backends import dp  # noqa: F401
from cxrdist.engine.backends import ddp  # noqa: F401
from cxrdist.engine.backends import deepspeed  # noqa: F401
from cxrdist.engine.backends import fsdp  # noqa: F401
from cxrdist.engine.backends.base import (
    AMP_DTYPES,
    REGISTRY,
    Backend,
    Layout,
    backend_class,
    get_backend,
    layout_of,
    names,
    read_weights,
    register,
    validate_config,
)

__all__ = [
    "AMP_DTYPES",
    "REGISTRY",
    "Backend",
    "Layout",
    "backend_class",
    "get_backend",
    "layout_of",
    "names",
    "read_weights",
    "register",
    "validate_config",
]
