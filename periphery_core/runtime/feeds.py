"""Input tensors for a model: seeded random feeds shaped from the model, or a user's `.npz`.

Random integers are small non-negative values (safe as token ids, positions and indices);
inputs named like attention masks get ones so that no row is fully masked.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from periphery_core.errors import FeedError
from periphery_core.model.shapes import InputSpec

Feeds = dict[str, np.ndarray]


def random_feeds(specs: Sequence[InputSpec], seed: int = 0) -> Feeds:
    """One random tensor per input, reproducible for a given seed."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in specs:
        dt = spec.dtype
        if spec.kind != "tensor":
            raise FeedError(f"input '{spec.name}' is a {spec.kind}: random data cannot stand "
                            "in for it; pass real inputs")
        if dt == np.bool_:
            value = rng.integers(0, 2, spec.shape).astype(np.bool_)
        elif np.issubdtype(dt, np.integer):
            if "mask" in spec.name.lower():
                value = np.ones(spec.shape, dtype=dt)
            else:
                value = rng.integers(0, 2, spec.shape).astype(dt)
        elif np.issubdtype(dt, np.floating):
            value = rng.standard_normal(spec.shape).astype(dt)
        elif dt.kind in "US":
            value = np.full(spec.shape, "a", dtype=object)
        else:
            raise FeedError(
                f"cannot make random data for input '{spec.name}' of type {dt}; pass --inputs"
            )
        feeds[spec.name] = value
    return feeds


def read_named_arrays(path: Path, names: Sequence[str]) -> Feeds:
    """The arrays of a `.npz` (pickles refused), which must be exactly `names`.

    Raises:
        FeedError: unreadable, or an array missing or extra, said in one line.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        raise FeedError(
            f"{path} is not a .npz archive of arrays (make one with numpy.savez)"
        ) from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise FeedError(f"{path} has no array named '{missing[0]}' (model inputs: "
                        f"{', '.join(names)})")
    extra = [n for n in arrays if n not in names]
    if extra:
        raise FeedError(f"{path} has an array '{extra[0]}' that is not a model input "
                        f"(model inputs: {', '.join(names)})")
    return arrays


def load_npz(path: str | Path, specs: Sequence[InputSpec]) -> Feeds:
    """Read a `.npz` of input tensors and check names, dtypes and ranks."""
    p = Path(path)
    if not p.is_file():
        raise FeedError(f"inputs file not found: {p}")
    expected = {s.name: s for s in specs}
    feeds = read_named_arrays(p, list(expected))
    for name, spec in expected.items():
        arr = feeds[name]
        if arr.dtype != spec.dtype:
            raise FeedError(f"input '{name}' in {p} is {arr.dtype}; the model expects {spec.dtype}")
        if arr.ndim != len(spec.shape):
            raise FeedError(f"input '{name}' in {p} has rank {arr.ndim}; the model expects "
                            f"rank {len(spec.shape)}")
    return feeds
