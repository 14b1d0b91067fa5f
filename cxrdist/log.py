"""The package logger: every record says which rank on which host said it.

Job logs of a multi-rank run interleave every rank's stderr (submitit, sbatch --output); a line without its
rank is a riddle. ``setup`` is called once per process, by the trainer, with this process's rank.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "cxrdist"


class _RankFilter(logging.Filter):
    """Adds the rank prefix, and redacts the message: a log line never shows a location's credentials."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        from cxrdist.redact import redact

        record.rank_prefix = self.prefix
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def setup(rank: int = 0, world_size: int = 1, host: str = "", level: int = logging.INFO) -> logging.Logger:
    """Log ``[cxrdist rank R/W host] message`` to stderr (replacing an earlier setup of this process)."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if getattr(h, "_cxrdist", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._cxrdist = True
    handler.addFilter(_RankFilter(f"rank {rank}/{world_size}" + (f" {host}" if host else "")))
    handler.setFormatter(logging.Formatter("[cxrdist %(rank_prefix)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def console(stderr: bool = False, **kwargs):
    """A rich Console for tables: in a terminal its width; in a SLURM or CI log (not a terminal) 200
    columns, since rich would otherwise squeeze a wide table into 80 (``COLUMNS`` still wins)."""
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, width=width, **kwargs)
