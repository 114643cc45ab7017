"""How numbers read, in one place: bytes, counts, seconds and shapes, for the CLI's tables, the
app's screens, event lines and error messages alike."""

from __future__ import annotations

import math
import re

_BYTE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6,
               "mib": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12,
               "tib": 2**40}


def parse_bytes(text: str) -> int:
    """`512MiB` -> 536870912; `2G` and `2GB` -> 2e9; `4096` -> 4096.

    Raises:
        ValueError: one line saying what a size looks like.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"'{text}' is not a size: give a number of bytes with an optional "
                         "unit, such as 512MiB or 2GB")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


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


def human_rate(per_s: float) -> str:
    """A rate such as requests/s to three figures, whole ones with thousands separated:
    `7.28`, `94.7`, `1,390` (not `1.39e+03`)."""
    rounded = float(f"{per_s:.3g}")
    return f"{rounded:,.0f}" if abs(rounded) >= 1000 else f"{per_s:.3g}"


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


_MARKS = re.compile(r"\((?:R|TM|r|tm)\)|\bCPU\b|\bProcessor\b|@ *[\d.]+ *[GM]Hz")


def device_text(name: str) -> str:
    """A device's name as a table shows it: a CPU's brand string without its trademark signs,
    'CPU', 'Processor' and clock ('Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz' reads 'Intel Xeon
    Gold 6248'); a GPU's as it is."""
    return " ".join(_MARKS.sub(" ", name).split()) or name
