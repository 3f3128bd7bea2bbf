"""Each committed checkpoint is an event in events.jsonl with what it cost (issue 34), which the
doctor and the report take for what it is: bookkeeping, not a failure."""

from __future__ import annotations

import json

from reliability_helpers import read_jsonl, tiny  # noqa: F401

KEYS = {"kind", "step", "bytes", "seconds", "hash_seconds", "blocking_seconds"}


def test_each_committed_save_is_an_event_the_doctor_and_report_take_in_stride(tiny, tmp_path):  # noqa: F811
    from kiln.runs.doctor import diagnose
    from kiln.runs.report import write_report
    from kiln.train.session import start_run

    make, runs = tiny
    start_run(make("train.steps=12", "checkpoint.every=4", "checkpoint.keep=2"), runs, "ev")
    run = runs / "ev"
    events = read_jsonl(run / "events.jsonl")
    saves = [e for e in events if e["kind"] == "checkpoint"]
    assert [e["step"] for e in saves] == [4, 8, 12]  # one per committed save, retention aside
    for e in saves:
        assert set(e) == KEYS
        assert isinstance(e["bytes"], int) and e["bytes"] > 0
        assert 0 <= e["hash_seconds"] <= e["seconds"]
        assert e["blocking_seconds"] == e["seconds"]  # a synchronous save holds the loop throughout
    newest = json.loads((run / "checkpoints" / "step-00000012" / "manifest.json").read_text())["files"]
    assert saves[-1]["bytes"] == sum(f["bytes"] for f in newest.values())

    findings = diagnose(run)
    assert not [f for f in findings if "checkpoint" in f["kind"]]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events if e["kind"] != "checkpoint"))
    assert diagnose(run) == findings  # the same findings without them: the doctor ignores them
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    paths = write_report(run, tmp_path / "report", log=lambda _: None)
    assert paths["md"].is_file()
