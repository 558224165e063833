"""JSON that strict readers accept. Python's json writes NaN and Infinity, which are not JSON; every
file the project writes (status.json, metrics.jsonl, manifests, trainer state) goes through `dumps`,
which writes a non-finite number as null."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """obj with every non-finite float (NaN, +-Infinity) replaced by None, in nested dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """json.dumps, strict: non-finite numbers as null (never the bare NaN / Infinity tokens)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
