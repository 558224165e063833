"""`h3pretrain summary RUN_DIR`: a run's result in two lines and the next three commands (sample from
it, export it, browse its metrics), each printed so that it can be pasted as it is. `make pretrain`
ends with it."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from . import rundir
from .errors import InputFileError

PROMPT = "The module"
NEW_TOKENS = 40


def _shown(path: Path) -> str:
    """A path as a command line takes it: relative to the working directory when inside it."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(Path(path).absolute())


def _tool(name: str) -> str:
    """The command of this environment's `name` script (h3pretrain, mlflow)."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return shlex.quote(_shown(script))
    return f"{shlex.quote(sys.executable)} -m h3pretrain.cli" if name == "h3pretrain" else name


def _number(value, digits: int = 4) -> str:
    """A logged number (null when it was not finite)."""
    return "nan" if value is None else f"{value:.{digits}f}"


def _train_config(run: Path) -> dict:
    """The train section of the run's config.yaml ({} when there is none, or it cannot be read)."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    train = config.get("train") if isinstance(config, dict) else None
    return train if isinstance(train, dict) else {}


def summary(run_dir: str) -> list[str]:
    """The lines `h3pretrain summary` prints for run_dir (as the user wrote it)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputFileError(f"{run_dir}: no such directory")
    try:
        status = rundir.read_status(run)
    except ValueError as err:
        raise InputFileError(str(err)) from None
    if status is None:
        raise InputFileError(f"{run_dir}: not a run directory (no status.json; `h3pretrain train` writes one)")
    records = rundir.last_records(run, ("train", "eval"))
    state = status.get("state", "unknown") + (f" ({status['error']})" if status.get("error") else "")
    parts = [f"run {run_dir}: {state}, step {status.get('step', '?')} of {status.get('steps', '?')}"]
    train, ev = records.get("train"), records.get("eval")
    if train:  # the step of the last logged loss, when it is not the run's step
        logged = f" (step {train.get('step')})" if train.get("step") != status.get("step") else ""
        parts.append(f"train loss {_number(train.get('loss'))}{logged}")
    else:
        parts.append("no step logged yet")
    parts.append(f"eval loss {_number(ev.get('loss'))}, perplexity {_number(ev.get('perplexity'), 2)} "
                 f"(step {ev.get('step')})" if ev else "no evaluation yet")
    latest = rundir.latest_checkpoint(run)
    lines = [" | ".join(parts),
             f"checkpoint {latest if latest else 'none yet'} | metrics {run / 'metrics.jsonl'}"]
    config = _train_config(run)
    commands = []
    if latest:
        quoted = shlex.quote(run_dir)
        commands += [f"{_tool('h3pretrain')} generate --checkpoint {quoted} --prompt {shlex.quote(PROMPT)} "
                     f"--max-new-tokens {NEW_TOKENS}",
                     f"{_tool('h3pretrain')} export-hf --checkpoint {quoted} --out "
                     f"{shlex.quote(str(Path('hf') / run.absolute().name))}"]
    uri = rundir.mlflow_uri(run, config.get("mlflow_uri") or "")
    if config.get("mlflow", True) is False:
        commands.append("# mlflow was off for this run (train.mlflow=false)")
    elif uri.startswith(("http://", "https://")):
        commands.append(f"# open {uri}: the run is tracked by that mlflow server")
    else:
        commands.append(f"{_tool('mlflow')} ui --backend-store-uri {shlex.quote(uri)}")
    what = "sample from it, export it for transformers, browse its metrics" if latest else "browse its metrics"
    return lines + [f"next: {what}"] + [f"  {c}" for c in commands]


def main(run_dir: str) -> int:
    print("\n".join(summary(run_dir)), flush=True)
    return 0
