"""`npz:DIR` and `npy:DIR`: a folder of saved arrays, one sample per file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from periphery_core.errors import DataError, FeedError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.samples import Feeds, SampleSource, fit_sample
from periphery_core.runtime.feeds import read_named_arrays

LABELS_NPY = "labels.npy"  # beside a folder's samples: one label per sample, not a sample


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
                       if p.suffix.lower() == f".{kind}" and p.name != LABELS_NPY)
        if not files:
            raise DataError(f"{folder} holds no .{kind} files")
        labels = _load_labels_npy(folder / LABELS_NPY, len(files))
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


class ArrayFileSource(SampleSource):
    """`npz:FILE`: one `.npz` of named arrays, the same file `--inputs` takes.

    An array with the input's rank (batch dimension first) holds one sample per batch row, and
    one with a leading extra axis holds one sample per entry of it; so a file of model feeds is
    one sample, and stacking N of them gives N. A scalar input may stay one value for every
    sample. An array named `labels`, if present, holds one label per sample.
    """

    def __init__(self, path: Path, inputs: Sequence[InputSpec],
                 samples: int | None = None) -> None:
        names = [s.name for s in inputs]
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError, EOFError):
            raise DataError(f"{path} is not a .npz archive of arrays (make one with "
                            "numpy.savez)") from None
        labels = arrays.pop("labels", None)
        try:
            read = {n: arrays[n] for n in names}
        except KeyError as exc:
            raise DataError(f"{path} has no array named '{exc.args[0]}' (model inputs: "
                            f"{', '.join(names)})") from None
        extra = [k for k in arrays if k not in names]
        if extra:
            raise DataError(f"{path} has an array '{extra[0]}' that is not a model input "
                            f"(model inputs: {', '.join(names)})")
        self._per_sample: dict[str, np.ndarray] = {}  # name -> array indexed by sample
        self._shared: dict[str, np.ndarray] = {}  # scalars given once for every sample
        counts: dict[str, int] = {}
        for spec in inputs:
            arr, rank = read[spec.name], len(spec.shape)
            batched = rank > 0 and spec.shape[0] == 1  # a batch dimension to stack samples on
            if arr.ndim == rank + 1:
                self._per_sample[spec.name] = arr
            elif arr.ndim == rank and batched:
                self._per_sample[spec.name] = arr[:, np.newaxis]
            elif arr.ndim == rank or (batched and arr.ndim == rank - 1):
                if rank == 0:
                    self._shared[spec.name] = _fit(arr, spec, path)
                    continue
                self._per_sample[spec.name] = arr[np.newaxis]
            else:
                raise DataError(f"'{spec.name}' in {path} has rank {arr.ndim}; the model "
                                f"expects rank {rank} (or {rank + 1} with a leading sample axis)")
            counts[spec.name] = len(self._per_sample[spec.name])
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
            raise DataError(f"the arrays in {path} hold different numbers of samples ({listed})")
        count = next(iter(counts.values()), 1)
        if labels is not None and labels.ndim != 1:
            raise DataError(f"'labels' in {path} must be one label per sample")
        if samples is not None:
            count = min(count, samples)
            labels = None if labels is None else labels[:count]
        self.path = path
        self.description = f"{count} sample{'s' if count != 1 else ''} from {path}"
        super().__init__(inputs, count, labels)
        self.sample(0)

    def sample(self, index: int) -> Feeds:
        feeds = dict(self._shared)
        for spec in self.inputs:
            if spec.name in self._per_sample:
                feeds[spec.name] = _fit(self._per_sample[spec.name][index], spec, self.path)
        return feeds


def _fit(arr: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """One sample for an input; an input without a batch dimension of 1 takes it as it is."""
    if arr.ndim == len(spec.shape) and (not spec.shape or spec.shape[0] != 1):
        if arr.dtype != spec.dtype:
            raise DataError(f"'{spec.name}' in {path} is {arr.dtype}; the model expects "
                            f"{spec.dtype} (save it with .astype(np.{spec.dtype.name}))")
        return arr
    return fit_sample(arr, spec, str(path))
