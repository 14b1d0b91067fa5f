#!/usr/bin/env python3
"""Submit `cxrdist train` to SLURM, or run it on this machine, through submitit (dinov2's run/submit.py shape).

    python launchers/submit.py --nodes 1 --gpus 4 --backend ddp [--wait] -- --shards shards/x --epochs 3

Launcher flags first (`--help`), then `--` and any `cxrdist train` option. All the work is in cxrdist.launch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _use_repo_python() -> None:
    """`python launchers/submit.py` with an interpreter lacking the project: re-run under the repo's venv."""
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


def main(argv: list[str] | None = None) -> int:
    _use_repo_python()
    from cxrdist import launch

    return launch.main(argv)


if __name__ == "__main__":
    sys.exit(main())
