"""Number formatting for the app's tables and bars: bars here, the rest from the core's one
home for how numbers read (`periphery_core.units`)."""

from __future__ import annotations

import math

from periphery_core.units import (
    human_bytes,
    human_count,
    human_rate,
    human_seconds,
    shape_text,
)

__all__ = ["bar", "human_bytes", "human_count", "human_rate", "human_seconds", "shape_text"]


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of `width` cells filled to `fraction`, with eighth-cell resolution."""
    fraction = 0.0 if math.isnan(fraction) else min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[rest] if rest else ""
    return ("█" * full + partial).ljust(width)
