"""`npz:DIR` and `npy:DIR`: a folder of saved arrays, one sample per file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from periphery_core.errors import DataError, FeedError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.samples import Feeds, SampleSource, fit_sample
from periphery_core.runtime.feeds import read_named_arrays


class ArrayFolderSource(SampleSource):
    """A folder of `.npz` files (one sample each, arrays named like the inputs) or `.npy` files.

    `.npy` serves single-input models. Files are taken in name order; `labels.npy` in the folder,
    if present, holds one label per file.
    """

    def __init__(self, folder: Path, inputs: Sequence[InputSpec], kind: str,
                 samples: int | None = None) -> None:
        self.kind = kind
        if kind == "npy" and len(inputs) != 1:
            raise DataError(f"npy: works for single-input models; this model has inputs "
                            f"{', '.join(s.name for s in inputs)}: use npz:{folder}")
        files = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() == f".{kind}" and p.name != "labels.npy")
        if not files:
            raise DataError(f"{folder} holds no .{kind} files")
        labels = _load_labels_npy(folder / "labels.npy", len(files))
        if samples is not None:
            files = files[:samples]
            labels = None if labels is None else labels[:samples]
        self.files = files
        self.description = f"{len(files)} .{kind} samples from {folder}"
        super().__init__(inputs, len(files), labels)
        self.sample(0)

    def sample(self, index: int) -> Feeds:
        path = self.files[index]
        names = [s.name for s in self.inputs]
        if self.kind == "npy":
            try:
                arrays = {names[0]: np.load(path, allow_pickle=False)}
            except (OSError, ValueError):
                raise DataError(f"{path} is not a readable .npy file of an array (write it "
                                "with numpy.save)") from None
        else:
            try:
                arrays = read_named_arrays(path, names)
            except FeedError as exc:
                raise DataError(exc.message) from None
        return {s.name: fit_sample(arrays[s.name], s, str(path)) for s in self.inputs}


def _load_labels_npy(path: Path, count: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        raise DataError(f"{path} is not a readable .npy array of labels") from None
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{path} must hold one label per sample file: {count} values, found "
                        f"shape {labels.shape}")
    return labels
