"""`jsonable`: reports with numpy values turned into plain JSON (the one converter all commands use)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """`x` with numpy arrays/scalars as lists/Python numbers, tuples as lists, dict keys as str,
    and non-finite floats (NaN, ±inf) as None, so `json.dumps` writes strict JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
