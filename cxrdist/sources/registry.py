"""The source registry: each dataset source is one module under ``sources/`` that registers a ``Source``.

A ``Source`` says what ``--root`` holds, its own label set (names and order: the default ``--labels``), what
``--split official`` means for it, how rows outside its official lists are split, and which ``cxrdist synth``
layouts write its format. Nothing outside its module names a source: the CLI, ``pack`` and the tests ask
the registry (``names``, ``get``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cxrdist.errors import UserError


@dataclass(frozen=True)
class Source:
    name: str
    labels: tuple[str, ...]  # its own label set, in the order its files give them
    read: Callable  # read(root, *, official: bool, **options) -> table.RawRows; touches no image
    root: str  # what --root is, in one line (errors and --help)
    official: str  # what --split official does with it, in one line
    synth_layouts: tuple[str, ...] = ()  # `cxrdist synth --layout` names that write its format
    # how `--split official` splits the rows its official lists leave open (train, val, test fractions)
    official_rest: tuple[float, float, float] = (0.9, 0.0, 0.1)
    # every image is frontal by the dataset's curation (RSNA): a row whose view the tables do not say ('')
    # is kept by --views frontal instead of dropped
    frontal_only: bool = False


REGISTRY: dict[str, Source] = {}


def register(source: Source) -> Source:
    REGISTRY[source.name] = source
    return source


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Source:
    if name not in REGISTRY:
        raise UserError(f"unknown source {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def for_layout(layout: str) -> Source:
    """The source whose format ``cxrdist synth --layout layout`` writes."""
    for s in REGISTRY.values():
        if layout in s.synth_layouts:
            return s
    raise UserError(f"no source reads the synthetic layout {layout!r}")
