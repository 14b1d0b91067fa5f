"""`launchers/submit.py` (and `python -m cxrdist.launch`): launcher flags, then `--` and `cxrdist train` flags."""

from __future__ import annotations

import sys

from cxrdist.errors import UserError
from cxrdist.launch.args import LaunchError, get_args_parser
from cxrdist.launch.monitor import wait
from cxrdist.launch.submit import describe, submit


def main(argv: list[str] | None = None) -> int:
    """`launchers/submit.py`: launcher flags, then `--` and the `cxrdist train` flags."""
    from cxrdist.config import parse_train_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        launcher_argv, train_argv = argv[:i], argv[i + 1 :]
    else:
        launcher_argv, train_argv = argv, []
    args = get_args_parser().parse_args(launcher_argv)
    try:
        if "--backend" in train_argv:
            raise LaunchError("--backend goes before `--` (it decides how the job is laid out)")
        cfg = parse_train_argv(train_argv)
        sub = submit(args, cfg)
    except UserError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    print(describe(sub), flush=True)
    if not args.wait:
        return 0
    try:
        return wait(sub, stream=True)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {sub.job_id} keeps running (scancel {sub.job_id} to stop it)", file=sys.stderr)
        return 130
