"""What the benchmark scripts share: timing fences, the device's name, writing a result file."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


def write_result(result: dict, out: str, default: str) -> Path:
    """Write `result` as JSON to `out` (or `default`) and say where."""
    path = Path(out or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {path}")
    return path
