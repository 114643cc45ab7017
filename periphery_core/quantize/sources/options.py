"""Reading a data spec's parts: the path it names and its `key=value` options.

Every problem is a `DataError` that quotes the spec, so the user sees which part to fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from periphery_core.errors import DataError


def existing_dir(spec: str, path: str) -> Path:
    """The folder a spec names (raises `DataError` if it is missing or a file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data folder not found: {p} (from '{spec}')")
    if not p.is_dir():
        raise DataError(f"{p} is a file; '{spec.partition(':')[0]}:' needs a folder")
    return p


def existing_file(spec: str, path: str) -> Path:
    """The file a spec names (raises `DataError` if it is missing or a folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {p} (from '{spec}')")
    if p.is_dir():
        raise DataError(f"{p} is a folder; '{spec.partition(':')[0]}:' needs a file")
    return p


def int_param(spec: str, params: dict[str, str], key: str, default: int) -> int:
    """A positive whole-number option, or `default` when absent."""
    if key not in params:
        return default
    try:
        value = int(params[key])
    except ValueError:
        raise DataError(f"'{spec}': {key}={params[key]} is not a whole number") from None
    if value <= 0:
        raise DataError(f"'{spec}': {key} must be positive, not {value}")
    return value


def floats_param(spec: str, params: dict[str, str], key: str, default: float) -> np.ndarray:
    """A number or comma-separated numbers (per channel), or `[default]` when absent."""
    if key not in params:
        return np.array([default], dtype=np.float32)
    try:
        values = [float(v) for v in params[key].split(",")]
    except ValueError:
        raise DataError(f"'{spec}': {key}={params[key]} is not a number or a comma-separated "
                        "list of numbers") from None
    if key in ("std", "scale") and any(v == 0 for v in values):
        raise DataError(f"'{spec}': {key} cannot be 0")
    return np.array(values, dtype=np.float32)
