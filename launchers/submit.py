#!/usr/bin/env python3
"""Submit `cxrdist train` to SLURM, or run it on this machine, through submitit (dinov2's run/submit.py shape).

    python launchers/submit.py --nodes 1 --gpus 4 --backend ddp [--wait] -- --shards shards/x --epochs 3

Launcher flags first (`--help`), then `--` and any `cxrdist train` option. All the work is in cxrdist.launch.
"""

from __future__ import annotations

import sys

from bootstrap import use_repo_python  # launchers/ is sys.path[0] when run as a script


def main(argv: list[str] | None = None) -> int:
    use_repo_python()
    from cxrdist import launch

    return launch.main(argv)


if __name__ == "__main__":
    sys.exit(main())
