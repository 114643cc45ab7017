"""`mnist:IDX_GZ`: MNIST images from an idx file, with labels when the labels file is found."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from periphery_core.errors import DataError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.options import existing_file, floats_param
from periphery_core.quantize.sources.samples import Feeds, SampleSource


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzip-compressed or not, as a uint8 array.

    Raises:
        DataError: the file is not an unsigned-byte idx file.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise DataError(f"{path} is a damaged gzip file") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (the MNIST format)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is a truncated idx file")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header < count:
        raise DataError(f"{path} is a truncated idx file: {len(raw) - header} bytes for "
                        f"shape {list(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


class MnistSource(SampleSource):
    """MNIST images from an idx3 file as float images: `pixel / scale`, then `(x - mean) / std`.

    The defaults (scale 255, mean 0, std 1) give values in [0, 1]: what the ONNX model zoo's
    mnist-8 was trained on (its logits are of order 10 there, and of order 1000 on raw 0-255
    pixels, although its top-1 accuracy is the same on both). Each image is reshaped to the
    model's input (for example [1,1,28,28], [1,28,28,1] or [1,784]).
    """

    def __init__(self, images: np.ndarray, inputs: Sequence[InputSpec],
                 labels: np.ndarray | None, *, scale: float, mean: float, std: float,
                 description: str) -> None:
        if len(inputs) != 1:
            raise DataError(f"mnist: works for single-input models; this model has inputs "
                            f"{', '.join(s.name for s in inputs)}")
        spec = inputs[0]
        pixels = int(np.prod(images.shape[1:]))
        per_sample = (1, *spec.shape[1:]) if spec.shape else ()
        if spec.dtype.kind != "f" or int(np.prod(per_sample)) != pixels:
            raise DataError(f"mnist: input '{spec.name}' is {spec.dtype} {list(spec.shape)}; "
                            f"MNIST needs a float input of {pixels} values per sample")
        self.description = description
        self._images = images
        self._shape = per_sample
        self._scale, self._mean, self._std = scale, mean, std
        super().__init__(inputs, len(images), labels)

    @classmethod
    def open(cls, spec: str, path: Path, inputs: Sequence[InputSpec], params: dict[str, str],
             samples: int | None) -> MnistSource:
        images = read_idx(path)
        if images.ndim != 3:
            raise DataError(f"{path} holds labels or other data (shape {list(images.shape)}), "
                            "not images: give the images file")
        start, stop = _range_param(spec, params.get("range"), len(images))
        labels_path: Path | None = None
        if "labels" in params:
            labels_path = existing_file(spec, params["labels"])
        elif (path.parent / "t10k-labels-idx1-ubyte.gz").exists():
            labels_path = path.parent / "t10k-labels-idx1-ubyte.gz"
        labels = None
        if labels_path is not None:
            labels = read_idx(labels_path).astype(np.int64)
            if labels.ndim != 1 or len(labels) != len(images):
                raise DataError(f"{labels_path} holds {labels.shape} labels for {len(images)} "
                                "images")
            labels = labels[start:stop]
        images = images[start:stop]
        if samples is not None:
            images = images[:samples]
            labels = None if labels is None else labels[:samples]
        values = {k: floats_param(spec, params, k, d)
                  for k, d in (("scale", 255.0), ("mean", 0.0), ("std", 1.0))}
        for key, arr in values.items():
            if len(arr) != 1:
                raise DataError(f"'{spec}': {key} takes one number for grey images")
        return cls(images, inputs, labels, scale=float(values["scale"][0]),
                   mean=float(values["mean"][0]), std=float(values["std"][0]),
                   description=f"{len(images)} MNIST images {start}..{start + len(images) - 1} "
                               f"from {path.name}")

    def sample(self, index: int) -> Feeds:
        spec = self.inputs[0]
        x = self._images[index].astype(np.float32) / self._scale
        x = (x - self._mean) / self._std
        return {spec.name: x.reshape(self._shape).astype(spec.dtype, copy=False)}


def _range_param(spec: str, value: str | None, total: int) -> tuple[int, int]:
    if value is None:
        return 0, total
    first, colon, last = value.partition(":")
    try:
        start = int(first) if first.strip() else 0
        stop = int(last) if last.strip() else total
    except ValueError:
        raise DataError(f"'{spec}': range={value} is not START:STOP, like range=200:10000") \
            from None
    if not colon or not 0 <= start < stop or stop > total:
        raise DataError(f"'{spec}': range={value} must be START:STOP with "
                        f"0 <= START < STOP <= {total}")
    return start, stop
