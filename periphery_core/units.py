"""How numbers read, in one place: bytes, counts, seconds and shapes, for the CLI's tables, the
app's screens, event lines and error messages alike."""

from __future__ import annotations

import math


def human_bytes(n: float | None) -> str:
    """`1536` -> `1.5 KiB`; `512` -> `512 B`; None -> `-`."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_count(n: float | None, unit: str = "") -> str:
    """`1.9e9` -> `1.90 G`; None -> `-`."""
    if n is None:
        return "-"
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def human_seconds(s: float | None) -> str:
    """`0.0123` -> `12.30 ms`; `4.2e-5` -> `42 µs`; None or NaN -> `-`."""
    if s is None or math.isnan(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def shape_text(shape: tuple[int, ...]) -> str:
    """`(1, 3, 224, 224)` -> `1x3x224x224`; `()` -> `scalar`."""
    return "x".join(map(str, shape)) if shape else "scalar"
