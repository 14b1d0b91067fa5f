"""The typed run folder: summaries written atomically and read back (older and partial ones too), the
trainer's state through a checkpoint's plain containers, and telemetry read while a rank writes it."""

from __future__ import annotations

import json

import torch

from cxrdist.runfolder import RunFolder, RunSummary, TrainState


def test_summary_round_trip_and_older_summaries(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    s = RunSummary(status="completed", backend="ddp", world_size=2, labels="nih", epochs=[{"epoch": 1}], test=None)
    run.write_summary(s)
    assert run.read_summary() == s
    assert json.loads(run.summary_path.read_text())["test"] is None  # a run without a test split says so
    # a summary from before label sets and with a key this version does not know
    run.summary_path.write_text(json.dumps({"status": "failed", "error": "boom", "future_key": 1, "epochs": None}))
    old = run.read_summary()
    assert (old.status, old.error, old.labels, old.epochs) == ("failed", "boom", "", [])


def test_unreadable_and_missing_summaries_are_problems_not_crashes(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_summary() is None
    run.summary_path.write_text('{"status": "compl')
    problems = []
    assert run.read_summary(problems) is None and "summary.json is unreadable" in problems[0]
    run.summary_path.write_text("[1, 2]")
    problems = []
    assert run.read_summary(problems) is None and problems == ["summary.json is not a JSON object"]


def test_train_state_through_a_weights_only_checkpoint(tmp_path):
    state = TrainState(epoch=2, step_in_epoch=3, global_step=17, hosts=["node1"], geometry={"world_size": 2})
    state.history.append({"epoch": 1, "time_s": 1.5})
    torch.save({**state.to_dict(), "model": {}}, tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    again = TrainState(hosts=["node7"])
    again.restore(saved)
    assert again.hosts == ["node7"]  # a requeued job keeps the nodes it landed on
    assert (again.epoch, again.step_in_epoch, again.global_step, again.history) == (2, 3, 17, state.history)


def test_telemetry_records_and_the_last_one_while_a_rank_writes(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "telemetry").mkdir()
    lines = [{"event": "start"}, {"event": "step", "step": 0}, {"event": "step", "step": 1}]
    (tmp_path / "telemetry" / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"ev')
    (tmp_path / "telemetry" / "rank1.jsonl").write_text("")
    (tmp_path / "telemetry" / "rankX.jsonl").write_text("")
    assert list(run.telemetry_files()) == [0, 1]
    problems = []
    assert run.records(0, problems) == lines and problems == ["telemetry/rank0.jsonl: 1 unreadable line(s) skipped"]
    assert run.last_record(0) == {"event": "step", "step": 1}  # the cut line is skipped
    assert run.last_record(1) is None and run.last_record(5) is None
