"""What a run directory says, read without torch: the trainer's status.json, the last records of
metrics.jsonl and the checkpoint `latest` names. `h3pretrain slurm status` and `h3pretrain summary`
read a run through these functions; the trainer (h3pretrain/train/) writes the files."""
from __future__ import annotations

import json
from pathlib import Path

TAIL_BYTES = 1 << 16  # the first piece of metrics.jsonl read from its end


def read_status(run_dir: Path) -> dict | None:
    """status.json as a dict, None when there is none; ValueError when it is not a JSON object."""
    path = Path(run_dir) / "status.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(status, dict):
        raise ValueError(f"{path}: not a JSON object")
    return status


def last_records(run_dir: Path, kinds: tuple[str, ...] = ("train",)) -> dict[str, dict]:
    """The last metrics.jsonl record of each kind in `kinds` (train, eval, checkpoint, spike); a kind
    the file does not hold is absent. The file is read from its end, in growing pieces, until every
    kind is found: a long run's file is large. A line that is not JSON (one being written) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    found: dict[str, dict] = {}
    with open(path, "rb") as f:
        start, size, cut = f.seek(0, 2), TAIL_BYTES, b""
        while start > 0 and len(found) < len(kinds):
            begin = max(0, start - size)
            f.seek(begin)
            lines = (f.read(start - begin) + cut).split(b"\n")
            cut = lines.pop(0) if begin > 0 else b""  # it may begin before this piece
            for line in reversed(lines):
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                kind = record.get("kind") if isinstance(record, dict) else None
                if kind in kinds and kind not in found:
                    found[kind] = record
            start, size = begin, size * 2
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint directory run_dir/checkpoints/latest names (None without one). Resume takes
    the newest complete checkpoint by step, which can be one ahead of this pointer."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        name = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
    except UnicodeDecodeError:
        name = ""
    return Path(run_dir) / "checkpoints" / name if name else None


def mlflow_uri(run_dir: Path, configured: str = "") -> str:
    """A run's mlflow tracking URI: train.mlflow_uri, or by default a sqlite database in run_dir."""
    return configured or f"sqlite:///{(Path(run_dir) / 'mlflow.db').absolute()}"
