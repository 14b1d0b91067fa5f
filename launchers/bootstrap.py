"""Let `python launchers/<script>.py` work with any interpreter: re-run under the repo's .venv when the
running one lacks the project's dependencies, and put the repo on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_repo_python() -> None:
    try:
        import submitit  # noqa: F401
        import yaml  # noqa: F401
    except ImportError:
        venv = REPO / ".venv" / "bin" / "python"
        if venv.is_file() and not os.environ.get("CXRDIST_REEXEC"):
            os.environ["CXRDIST_REEXEC"] = "1"
            os.execv(str(venv), [str(venv), *sys.argv])
        raise
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
