"""`h3pretrain summary RUN_DIR` on hand-made run directories: the exact lines for a finished, a
preempted and a failed run, the commands it prints for this environment's scripts, and one-line
errors (exit 2) for a directory that is missing or not a run. The docs test
(tests/test_docs.py) runs the printed commands on a real run of `make pretrain`."""
import json
import os
import sys
from pathlib import Path

import pytest

from h3pretrain.cli import main


def _run_dir(root: Path, status: dict, records: list, latest: str | None = "step-00000020",
             train: dict | None = None) -> Path:
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps(status))
    (run / "metrics.jsonl").write_text("".join(
        (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    if latest:
        (run / "checkpoints" / latest).mkdir()
        (run / "checkpoints" / "latest").write_text(latest + "\n")
    (run / "config.yaml").write_text("model:\n  d_model: 32\ntrain:\n  run_dir: run\n"
                                     + "".join(f"  {k}: {v}\n" for k, v in (train or {}).items()))
    return run


FINISHED = {"state": "finished", "step": 20, "steps": 20, "tokens": 81920, "loss": 6.12345}
RECORDS = [{"step": 10, "kind": "train", "loss": 7.5}, {"step": 10, "kind": "eval", "loss": 7.25, "perplexity": 1408.1},
           {"step": 20, "kind": "train", "loss": 6.12345},
           {"step": 20, "kind": "eval", "loss": 6.5, "perplexity": 665.1416}, {"step": 20, "kind": "checkpoint"}]


@pytest.fixture
def venv(tmp_path, monkeypatch):
    """A working directory holding `.venv/bin` with the h3pretrain and mlflow scripts, as the
    repository does; sys.executable is its python."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "h3pretrain", "mlflow"):
        (bin_dir / name).write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    return tmp_path


def _summary(capsys, *argv) -> tuple[int, list[str], str]:
    code = main(["summary", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_a_finished_run(venv, capsys):
    _run_dir(venv, FINISHED, RECORDS)
    code, lines, err = _summary(capsys, "run")
    assert (code, err) == (0, "")
    assert lines == [
        "run run: finished, step 20 of 20 | train loss 6.1235 | eval loss 6.5000, perplexity 665.14 (step 20)",
        "checkpoint run/checkpoints/step-00000020 | metrics run/metrics.jsonl",
        "next: sample from it, export it for transformers, browse its metrics",
        "  .venv/bin/h3pretrain generate --checkpoint run --prompt 'The module' --max-new-tokens 40",
        "  .venv/bin/h3pretrain export-hf --checkpoint run --out hf/run",
        f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{venv}/run/mlflow.db",
    ]


def test_a_preempted_run_with_a_cut_last_line_and_a_non_finite_loss(venv, capsys):
    status = {"state": "preempted", "step": 15, "steps": 300, "signal": "SIGUSR1"}
    records = RECORDS[:2] + [{"step": 14, "kind": "train", "loss": None}, '{"step": 15, "kind": "tr']
    _run_dir(venv, status, records, latest="step-00000015", train={"mlflow": "false"})
    code, lines, _ = _summary(capsys, "run/")
    assert code == 0
    assert lines[:2] == [
        "run run/: preempted, step 15 of 300 | train loss nan (step 14) | eval loss 7.2500, perplexity 1408.10 (step 10)",
        "checkpoint run/checkpoints/step-00000015 | metrics run/metrics.jsonl"]
    assert lines[-1] == "  # mlflow was off for this run (train.mlflow=false)"


def test_a_failed_run_without_a_checkpoint_and_a_tracking_server(venv, capsys):
    status = {"state": "failed", "step": 3, "steps": 300, "error": "step 3: loss nan, 3 steps in a row"}
    _run_dir(venv, status, [], latest=None, train={"mlflow_uri": "http://tracking:5000"})
    code, lines, _ = _summary(capsys, "run")
    assert code == 0
    assert lines == [
        "run run: failed (step 3: loss nan, 3 steps in a row), step 3 of 300 | no step logged yet | no evaluation yet",
        "checkpoint none yet | metrics run/metrics.jsonl",
        "next: browse its metrics",
        "  # open http://tracking:5000: the run is tracked by that mlflow server"]


def test_paths_outside_the_working_directory_and_without_the_scripts(tmp_path, monkeypatch, capsys):
    run = _run_dir(tmp_path / "runs", FINISHED, RECORDS)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(sys, "executable", "/opt/py/bin/python3")
    code, lines, _ = _summary(capsys, str(run))
    assert code == 0
    assert lines[3:] == [
        f"  /opt/py/bin/python3 -m h3pretrain.cli generate --checkpoint {run} --prompt 'The module' --max-new-tokens 40",
        f"  /opt/py/bin/python3 -m h3pretrain.cli export-hf --checkpoint {run} --out hf/run",
        f"  mlflow ui --backend-store-uri sqlite:///{run}/mlflow.db"]


def test_a_run_directory_with_a_space_is_quoted(venv, capsys):
    run = _run_dir(venv / "my runs", FINISHED, RECORDS)
    code, lines, _ = _summary(capsys, "my runs/run")
    assert code == 0 and run.is_dir()
    assert lines[3] == "  .venv/bin/h3pretrain generate --checkpoint 'my runs/run' --prompt 'The module' --max-new-tokens 40"
    assert lines[5] == f"  .venv/bin/mlflow ui --backend-store-uri 'sqlite:///{venv}/my runs/run/mlflow.db'"


@pytest.mark.parametrize("make, name, message", [
    (lambda ws: None, "nowhere", "nowhere: no such directory"),
    (lambda ws: (ws / "data").mkdir(), "data", "data: not a run directory (no status.json; `h3pretrain train` writes one)"),
    (lambda ws: (ws / "afile").write_text("x\n"), "afile", "afile: no such directory"),
    (lambda ws: ((ws / "bad").mkdir(), (ws / "bad" / "status.json").write_text('{"state": "runn')), "bad",
     "bad/status.json: not JSON (Unterminated string starting at: line 1 column 11 (char 10))"),
    (lambda ws: ((ws / "list").mkdir(), (ws / "list" / "status.json").write_text("[1, 2]")), "list",
     "list/status.json: not a JSON object"),
])
def test_a_missing_or_unreadable_run_directory_is_one_line(tmp_path, monkeypatch, capsys, make, name, message):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, lines, err = _summary(capsys, name)
    assert (code, lines) == (2, [])
    assert err == f"h3pretrain summary: error: {message}\n"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_the_last_eval_is_found_far_from_the_end_of_a_long_metrics_file(venv, capsys):
    run = _run_dir(venv, FINISHED, RECORDS)
    later = "".join(json.dumps({"step": 20, "kind": "train", "loss": 9.0 + i / 1e5}) + "\n" for i in range(6000))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:4]) + later
                                       + json.dumps(RECORDS[2]) + "\n" + '{"step": 21, "ki')
    assert os.path.getsize(run / "metrics.jsonl") > 3 << 16  # the eval record is in the third piece read
    code, lines, _ = _summary(capsys, "run")
    assert code == 0
    assert lines[0] == ("run run: finished, step 20 of 20 | train loss 6.1235 | eval loss 6.5000, perplexity 665.14 "
                        "(step 20)")
