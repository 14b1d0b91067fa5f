"""Watch a submitted run: its scheduler state, its progress (rank 0's telemetry), and at the end the
outcome of every rank (submitit's result pickles) with the failing rank's error."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cxrdist.launch.submit import Submission
from cxrdist.runfolder import RunFolder, RunSummary

# SLURM states after which the job will not run again
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_state(sub: Submission) -> tuple[str, str]:
    """(state, nodes) now; SLURM's state names; the local executor's RUNNING / FINISHED / INTERRUPTED."""
    if sub.executor == "slurm":
        info = sub.job.get_info(mode="force") or {}
        return (info.get("State") or "UNKNOWN").split()[0], info.get("NodeList", "")
    return sub.job.state, "localhost"


def _describe(rec: dict, epochs: int) -> str:
    ev, ep = rec.get("event"), rec.get("epoch", 0)
    if ev == "step":
        loss = rec.get("loss")
        return (
            f"epoch {ep + 1}/{epochs} step {rec.get('step', 0) + 1}"
            + (f" loss {loss:.4f}" if isinstance(loss, float) else "")
            + (f" {rec['images_per_s']:.0f} img/s/rank" if rec.get("images_per_s") else "")
        )
    if ev == "epoch":
        return f"epoch {ep + 1}/{epochs} done in {rec.get('epoch_time_s', 0):.1f} s"
    if ev == "resume":
        return f"resumed at epoch {ep + 1}, step {rec.get('step_in_epoch', 0)} (restart {rec.get('restarts')})"
    return f"preempted at epoch {ep + 1}, step {rec.get('step_in_epoch', 0)}: checkpointed"


def _task_outcomes(sub: Submission) -> list[tuple[int, str, Any]]:
    """(task, 'success'|'error'|'missing', result or traceback) from submitit's result pickles."""
    from submitit.core.utils import pickle_load

    out = []
    for t, paths in enumerate(sub.task_paths()):
        try:
            outcome, value = pickle_load(paths.result_pickle)
        except (OSError, EOFError, ValueError):
            outcome, value = "missing", None
        out.append((t, outcome, value))
    return out


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if "\r" not in ln]  # drop progress-bar redraws
    return "\n".join(lines[-n:])


def failure_report(sub: Submission, state: str) -> str:
    """The failing rank's error: its exception (submitit's result pickle), else the tail of its stderr."""
    outcomes = _task_outcomes(sub)
    errors = [(t, v) for t, o, v in outcomes if o == "error"]
    if errors:
        t, trace = errors[0]
        lines = [ln for ln in str(trace).strip().splitlines() if ln.strip()]
        return f"rank {t} raised: {lines[-1] if lines else '?'}\n" + "\n".join("    " + ln for ln in lines[-12:])
    paths = sub.task_paths()
    for marker in ("Traceback", "rror", ""):
        for t, p in enumerate(paths):
            tail = _tail(p.stderr)
            if tail and marker in tail:
                return f"rank {t} stderr ({p.stderr}):\n" + "\n".join("    " + ln for ln in tail.splitlines())
    return f"no error output; see {sub.log_dir}"


def wait(
    sub: Submission, stream: bool = True, out: TextIO | None = None, poll_s: float = 2.0, timeout_s: float | None = None
) -> int:
    """Block until the job ends; stream state changes and progress; 0 when every rank completed."""
    out = out or sys.stdout
    run = RunFolder(sub.run_dir)
    epochs = None

    def say(msg: str) -> None:
        if stream:
            print(f"[{time.strftime('%H:%M:%S')}] job {sub.job_id}: {msg}", file=out, flush=True)

    last_state, last_progress, t0, ran = None, None, time.monotonic(), False
    state = "UNKNOWN"
    while True:
        state, nodes = job_state(sub)
        if state != last_state:
            requeued = ran and state in ("PENDING", "REQUEUED", "REQUEUE_HOLD")
            say(
                f"{state}"
                + (f" on {nodes}" if nodes and state == "RUNNING" else "")
                + (" (requeued: waiting to restart)" if requeued else "")
            )
            last_state = state
            ran = ran or state == "RUNNING"
        rec = run.last_record()
        if rec is not None:
            if epochs is None:  # config.yaml is written by rank 0 before its first record: read it once
                epochs = (run.read_config().get("optim") or {}).get("epochs") or 0
            text = _describe(rec, epochs)
            if text != last_progress:
                say(text)
                last_progress = text
        if _finished(sub, state):
            break
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            say(f"still {state} after {timeout_s:.0f} s; not waiting longer")
            return 124
        time.sleep(poll_s)

    if sub.executor == "local" and "%" in sub.log_pattern:
        # submitit's local controller also makes the unformatted folder (".../%j"); it stays empty
        try:
            Path(sub.log_pattern).rmdir()
        except OSError:
            pass
    outcomes = _task_outcomes(sub)
    summary = run.read_summary()
    errors = [t for t, o, _ in outcomes if o == "error"]
    if not errors and all(o == "success" for _, o, _ in outcomes) and state not in FINAL_STATES - {"COMPLETED"}:
        extra = ""
        if summary:
            extra = f" ({_outcome(summary)})"
        say(f"done{extra}; run folder {sub.run_dir}")
        return 0
    if stream:
        label = state if state in FINAL_STATES - {"COMPLETED"} else "FAILED"
        say(f"{label}; logs in {sub.log_dir}")
        print(failure_report(sub, state), file=out, flush=True)
    return 1


def _finished(sub: Submission, state: str, grace_s: float = 10.0) -> bool:
    if sub.executor == "local":
        if state != "RUNNING":
            return True
        # submitit's local controller waits for every task: ranks left in a collective after another rank
        # raised would sit there until the collective timeout. Give them a moment, then end the job.
        if any(o == "error" for _, o, _ in _task_outcomes(sub)):
            sub._error_seen = sub._error_seen or time.monotonic()
            if time.monotonic() - sub._error_seen > grace_s:
                sub.job.cancel()
                return True
        return False
    if state in FINAL_STATES:
        return True
    outcomes = _task_outcomes(sub)
    if any(o == "error" for _, o, _ in outcomes):
        return True  # a rank raised: report it now (the others are being killed: srun --kill-on-bad-exit)
    # every rank reported success but the accounting has no final state (yet, or ever: no sacct)
    return all(o == "success" for _, o, _ in outcomes) and state not in (
        "PENDING",
        "REQUEUED",
        "RUNNING",
        "COMPLETING",
        "REQUEUE_HOLD",
    )


def _outcome(s: RunSummary) -> str:
    """'completed, 2 epoch(s), restarts 0, val AUC 81.20, test AUC 80.10 / accuracy 88.00'."""
    scores = ""
    if s.epochs and s.epochs[-1].get("val_auc_mean") is not None:
        scores += f", val AUC {100 * s.epochs[-1]['val_auc_mean']:.2f}"
    test = s.test or {}
    if test.get("auc_mean") is not None:
        scores += f", test AUC {100 * test['auc_mean']:.2f} / accuracy {100 * test['accuracy_mean']:.2f}"
    return f"{s.status}, {len(s.epochs)} epoch(s), restarts {s.restarts}{scores}"
