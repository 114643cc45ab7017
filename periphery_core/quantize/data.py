"""Calibration and evaluation data: one spec string opens a source of model feeds.

A spec is `SCHEME:PATH?key=value&key=value` (the CLI's `--calib` and `--data`): `random`,
`npz:DIR`, `npy:DIR`, `images:DIR`, `mnist:IDX_GZ`, `text:FILE` and `stsb:TSV`. Every source
is shaped by the model's inputs, so what it yields always fits the model: right names, dtypes and
ranks, with the batch dimension first. Anything that does not fit is a `DataError` raised when the
source is opened (the first sample is checked eagerly), never a crash inside ONNX Runtime.

Key design choice: a source knows its samples one by one and stacks them into batches on
demand, so the same source serves calibration (batch 1) and evaluation (larger batches), and a
sample's content never depends on the batch size. Text is the exception: a text batch is padded
to its longest sentence, as a tokenizer does for a real batch.
"""

from __future__ import annotations

import csv
import gzip
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from periphery_core.errors import DataError, FeedError
from periphery_core.model.shapes import InputSpec
from periphery_core.runtime.feeds import random_feeds, read_named_arrays

Feeds = dict[str, np.ndarray]

SCHEMES = ("random", "npz:DIR", "npy:DIR", "images:DIR", "mnist:IDX_GZ", "text:FILE", "stsb:TSV")
DEFAULT_RANDOM_SAMPLES = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")




class DataSource(Protocol):
    """Samples of model feeds, in a fixed order, optionally with labels."""

    description: str

    def __len__(self) -> int:
        """Number of samples that `batches` yields in total."""
        ...

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        """Model feeds, in order; every array has the batch dimension first.

        The last batch may be smaller than `batch_size`.
        """
        ...

    def labels(self) -> np.ndarray | None:
        """One label or score per sample, aligned with `batches`' order, or None."""
        ...


# --------------------------------------------------------------------------------------------
# Spec parsing


def open_source(
    spec: str, inputs: Sequence[InputSpec], *, samples: int | None = None, seed: int = 0
) -> DataSource:
    """Open the data source a spec string names, shaped for a model's inputs.

    Args:
        spec: `random`, `npz:DIR`, `npy:DIR`, `images:DIR?...`, `mnist:FILE?...`,
            `text:FILE?...` or `stsb:TSV?...` (see the module docstring).
        inputs: the model's inputs with concrete shapes (batch dimension first).
        samples: use at most this many samples (pairs for `stsb`); None: all of them
            (32 for `random`).
        seed: seed for `random`.

    Raises:
        DataError: unknown scheme, bad query, missing or empty data, or data that does not fit
            the model's inputs.
    """
    if samples is not None and samples <= 0:
        raise DataError(f"the number of samples must be positive, not {samples}")
    head, qmark, query = spec.partition("?")
    scheme, sep, path = head.partition(":")
    scheme = scheme.strip().lower()
    if not qmark:
        query = ""
    params = _parse_query(spec, query)
    openers: dict[str, Callable[[], DataSource]] = {
        "random": lambda: RandomSource(inputs, samples or DEFAULT_RANDOM_SAMPLES, seed),
        "npz": lambda: ArrayFolderSource(_existing_dir(spec, path), inputs, "npz", samples),
        "npy": lambda: ArrayFolderSource(_existing_dir(spec, path), inputs, "npy", samples),
        "images": lambda: ImageFolderSource(
            _existing_dir(spec, path), inputs, ImageOptions.parse(spec, params), samples),
        "mnist": lambda: MnistSource.open(spec, _existing_file(spec, path), inputs, params,
                                          samples),
        "text": lambda: TextSource(_existing_file(spec, path), inputs,
                                   _text_encoder(spec, path, inputs, params), samples),
        "stsb": lambda: StsbSource(_existing_file(spec, path), inputs,
                                   _text_encoder(spec, path, inputs, params), samples),
    }
    allowed: dict[str, tuple[str, ...]] = {
        "random": (), "npz": (), "npy": (), "images": ImageOptions.KEYS,
        "mnist": ("labels", "range", "scale", "mean", "std"),
        "text": ("tokenizer", "max_length", "padding"),
        "stsb": ("tokenizer", "max_length", "padding"),
    }
    if scheme not in openers:
        what = f"unknown data scheme '{scheme}' in '{spec}'" if sep else f"'{spec}' has no scheme"
        raise DataError(f"{what}; use one of: {', '.join(SCHEMES)}")
    if scheme == "random" and sep:
        raise DataError(f"'{spec}': random data takes no path; write just 'random'")
    if scheme != "random" and not path.strip():
        raise DataError(f"'{spec}' names no path: write {scheme}:PATH")
    unknown = [k for k in params if k not in allowed[scheme]]
    if unknown:
        known = ", ".join(allowed[scheme]) or "none"
        raise DataError(f"'{spec}': unknown option '{unknown[0]}' for {scheme} "
                        f"(options: {known})")
    return openers[scheme]()


def _parse_query(spec: str, query: str) -> dict[str, str]:
    # Split by hand rather than with urllib: '+' and '%' in paths must stay as written.
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise DataError(f"'{spec}': option '{part}' is not KEY=VALUE")
        params[key.strip().lower()] = value.strip()
    return params


def _existing_dir(spec: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data folder not found: {p} (from '{spec}')")
    if not p.is_dir():
        raise DataError(f"{p} is a file; '{spec.partition(':')[0]}:' needs a folder")
    return p


def _existing_file(spec: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {p} (from '{spec}')")
    if p.is_dir():
        raise DataError(f"{p} is a folder; '{spec.partition(':')[0]}:' needs a file")
    return p


def _int_param(spec: str, params: dict[str, str], key: str, default: int) -> int:
    if key not in params:
        return default
    try:
        value = int(params[key])
    except ValueError:
        raise DataError(f"'{spec}': {key}={params[key]} is not a whole number") from None
    if value <= 0:
        raise DataError(f"'{spec}': {key} must be positive, not {value}")
    return value


def _floats_param(spec: str, params: dict[str, str], key: str, default: float) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------
# Fitting arrays to inputs


def _batch_rank_checked(inputs: Sequence[InputSpec]) -> None:
    for spec in inputs:
        if spec.kind != "tensor":
            raise DataError(f"input '{spec.name}' is a {spec.kind} of tensors: data sources give "
                            "tensors only")


def _fit_sample(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """One sample as a batch of one: add the batch dimension if the file left it out."""
    rank = len(spec.shape)
    if arr.dtype != spec.dtype:
        raise DataError(f"'{spec.name}' in {where} is {arr.dtype}; the model expects "
                        f"{spec.dtype} (save it with .astype(np.{spec.dtype.name}))")
    if rank == 0:
        if arr.ndim != 0:
            raise DataError(f"'{spec.name}' in {where} has rank {arr.ndim}; the model expects "
                            "a scalar")
        return arr
    if arr.ndim == rank - 1:
        return arr[np.newaxis]
    if arr.ndim != rank:
        raise DataError(f"'{spec.name}' in {where} has rank {arr.ndim}; the model expects rank "
                        f"{rank} (or {rank - 1} without the batch dimension)")
    if arr.shape[0] != 1:
        raise DataError(f"'{spec.name}' in {where} holds {arr.shape[0]} samples; put one sample "
                        "in each file")
    return arr


def _stack(parts: Sequence[Feeds], inputs: Sequence[InputSpec]) -> Feeds:
    if len(parts) == 1:
        return dict(parts[0])
    scalars = [s.name for s in inputs if not s.shape]
    if scalars:
        raise DataError(f"input '{scalars[0]}' is a scalar and has no batch dimension: use "
                        "batch size 1")
    out: Feeds = {}
    for spec in inputs:
        arrays = [p[spec.name] for p in parts]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"samples of '{spec.name}' have different shapes "
                            f"({', '.join(map(str, sorted(shapes)))}) and cannot share a batch: "
                            "use batch size 1")
        out[spec.name] = np.concatenate(arrays)
    return out


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise DataError(f"the batch size must be positive, not {batch_size}")


class _SampleSource:
    """A source that makes one sample at a time (a batch of one) and stacks them."""

    description = ""

    def __init__(self, inputs: Sequence[InputSpec], count: int,
                 labels: np.ndarray | None = None) -> None:
        _batch_rank_checked(inputs)
        if count <= 0:
            raise DataError(f"{self.description or 'the data source'} holds no samples")
        if labels is not None and len(labels) != count:
            raise DataError(f"{self.description}: {len(labels)} labels for {count} samples")
        self.inputs = tuple(inputs)
        self._count = count
        self._labels = labels

    def __len__(self) -> int:
        return self._count

    def sample(self, index: int) -> Feeds:
        """Feeds for one sample, each with a batch dimension of 1."""
        raise NotImplementedError

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        _check_batch_size(batch_size)
        for start in range(0, self._count, batch_size):
            stop = min(self._count, start + batch_size)
            yield _stack([self.sample(i) for i in range(start, stop)], self.inputs)

    def labels(self) -> np.ndarray | None:
        return self._labels


# --------------------------------------------------------------------------------------------
# random


class RandomSource(_SampleSource):
    """Seeded random feeds shaped from the input specs; sample i uses seed + i."""

    def __init__(self, inputs: Sequence[InputSpec], count: int, seed: int = 0) -> None:
        self.description = f"{count} random samples (seed {seed})"
        super().__init__(inputs, count)
        self._seed = seed
        self._one = tuple(
            InputSpec(s.name, s.dtype, (1, *s.shape[1:]) if s.shape else (), s.kind)
            for s in inputs
        )
        self.sample(0)

    def sample(self, index: int) -> Feeds:
        try:
            return random_feeds(self._one, seed=self._seed + index)
        except FeedError as exc:
            raise DataError(exc.message) from None


# --------------------------------------------------------------------------------------------
# npz:DIR and npy:DIR


class ArrayFolderSource(_SampleSource):
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
        return {s.name: _fit_sample(arrays[s.name], s, str(path)) for s in self.inputs}


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


# --------------------------------------------------------------------------------------------
# images:DIR


class ImageOptions:
    """How pictures become a float tensor: size, layout, scale, mean/std and colour."""

    KEYS = ("size", "layout", "mean", "std", "scale", "gray")

    def __init__(self, size: tuple[int, int] | None, layout: str, mean: np.ndarray,
                 std: np.ndarray, scale: float, gray: bool | None) -> None:
        self.size = size
        self.layout = layout
        self.mean = mean
        self.std = std
        self.scale = scale
        self.gray = gray

    @classmethod
    def parse(cls, spec: str, params: dict[str, str]) -> ImageOptions:
        size: tuple[int, int] | None = None
        if "size" in params:
            try:
                h, w = (int(v) for v in params["size"].lower().split("x"))
            except ValueError:
                raise DataError(f"'{spec}': size={params['size']} is not HxW, like "
                                "size=224x224") from None
            if h <= 0 or w <= 0:
                raise DataError(f"'{spec}': size must be positive, not {params['size']}")
            size = (h, w)
        layout = params.get("layout", "nchw").lower()
        if layout not in ("nchw", "nhwc"):
            raise DataError(f"'{spec}': layout={layout} is neither nchw nor nhwc")
        gray: bool | None = None
        if "gray" in params:
            if params["gray"] not in ("0", "1"):
                raise DataError(f"'{spec}': gray={params['gray']} must be 0 or 1")
            gray = params["gray"] == "1"
        scale = _floats_param(spec, params, "scale", 255.0)
        if len(scale) != 1:
            raise DataError(f"'{spec}': scale takes one number")
        return cls(size, layout, _floats_param(spec, params, "mean", 0.0),
                   _floats_param(spec, params, "std", 1.0), float(scale[0]), gray)


class ImageFolderSource(_SampleSource):
    """JPEG and PNG pictures from a folder, in name order, as one float image input.

    Each picture is resized (bilinear) to the model's height and width (or `size=`), divided by
    `scale`, normalised with `(x - mean) / std` per channel and laid out as NCHW or NHWC. An
    optional `labels.txt` in the folder holds `filename<TAB>label` lines.
    """

    def __init__(self, folder: Path, inputs: Sequence[InputSpec], options: ImageOptions,
                 samples: int | None = None) -> None:
        try:
            import PIL.Image  # noqa: F401  (an optional dependency: fail with a clear line)
        except ImportError:
            raise DataError("images: needs Pillow: pip install pillow") from None
        if len(inputs) != 1:
            raise DataError(f"images: works for single-input models; this model has inputs "
                            f"{', '.join(s.name for s in inputs)}")
        spec = inputs[0]
        if len(spec.shape) != 4 or spec.dtype.kind != "f":
            raise DataError(f"images: input '{spec.name}' is {spec.dtype} with shape "
                            f"{list(spec.shape)}; images need a rank-4 float input")
        channel_axis = 1 if options.layout == "nchw" else 3
        channels = spec.shape[channel_axis]
        if channels not in (1, 3):
            other = "nhwc" if options.layout == "nchw" else "nchw"
            raise DataError(f"images: input '{spec.name}' {list(spec.shape)} has {channels} "
                            f"channels in {options.layout} layout; try layout={other}")
        if options.gray is not None and options.gray != (channels == 1):
            raise DataError(f"images: gray={int(options.gray)} but input '{spec.name}' has "
                            f"{channels} channels")
        for key in ("mean", "std"):
            n = len(getattr(options, key))
            if n not in (1, channels):
                raise DataError(f"images: {key} has {n} values; give 1 or {channels}")
        h, w = spec.shape[2:4] if options.layout == "nchw" else spec.shape[1:3]
        if options.size is not None:
            h, w = options.size
        elif h <= 1 or w <= 1:
            raise DataError(f"images: input '{spec.name}' has no fixed height and width; add "
                            "size=HxW to the spec")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder} holds no .jpg or .png pictures")
        labels = _image_labels(folder / "labels.txt", files)
        if samples is not None:
            files = files[:samples]
            labels = None if labels is None else labels[:samples]
        self.files = files
        self.options = options
        self.height, self.width, self.channels = h, w, channels
        self.description = f"{len(files)} pictures from {folder} at {h}x{w}"
        super().__init__(inputs, len(files), labels)
        self.sample(0)

    def sample(self, index: int) -> Feeds:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        opts = self.options
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
        except (OSError, UnidentifiedImageError):
            raise DataError(f"{path} is not a readable picture") from None
        hwc = pixels.reshape(self.height, self.width, self.channels) / opts.scale
        hwc = (hwc - opts.mean) / opts.std
        tensor = hwc.transpose(2, 0, 1) if opts.layout == "nchw" else hwc
        spec = self.inputs[0]
        return {spec.name: np.ascontiguousarray(tensor[np.newaxis], dtype=spec.dtype)}


def _image_labels(path: Path, files: Sequence[Path]) -> np.ndarray | None:
    if not path.exists():
        return None
    table: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, tab, label = line.partition("\t")
        if not tab:
            raise DataError(f"{path} line {number} is not FILENAME<TAB>LABEL")
        table[name.strip()] = label.strip()
    missing = [f.name for f in files if f.name not in table]
    if missing:
        raise DataError(f"{path} has no label for {missing[0]}")
    values = [table[f.name] for f in files]
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except ValueError:
        pass
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: labels must be numbers (class indices or scores)") from None


# --------------------------------------------------------------------------------------------
# mnist:IDX_GZ


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


class MnistSource(_SampleSource):
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
            labels_path = _existing_file(spec, params["labels"])
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
        values = {k: _floats_param(spec, params, k, d)
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


# --------------------------------------------------------------------------------------------
# text:FILE and stsb:TSV


class TextEncoder:
    """Sentences to the model's token inputs with a Hugging Face `tokenizers` tokenizer."""

    def __init__(self, tokenizer: Any, inputs: Sequence[InputSpec], max_length: int,
                 pad_to_max: bool) -> None:
        names = [s.name for s in inputs]
        unknown = [n for n in names if n not in TEXT_INPUTS]
        if unknown or "input_ids" not in names:
            raise DataError(f"text data fills inputs named {', '.join(TEXT_INPUTS)}; this "
                            f"model's inputs are {', '.join(names)}")
        for s in inputs:
            if s.dtype.kind not in "iu" or len(s.shape) != 2:
                raise DataError(f"text: input '{s.name}' is {s.dtype} {list(s.shape)}; token "
                                "inputs must be integer [batch, sequence]")
        self.inputs = tuple(inputs)
        padding = tokenizer.padding or {}
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(
            pad_id=padding.get("pad_id", 0), pad_type_id=padding.get("pad_type_id", 0),
            pad_token=padding.get("pad_token", "[PAD]"),
            length=max_length if pad_to_max else None)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, sentences: Sequence[str]) -> Feeds:
        encodings = self.tokenizer.encode_batch(list(sentences))
        fields = {"input_ids": "ids", "attention_mask": "attention_mask",
                  "token_type_ids": "type_ids"}
        return {s.name: np.array([getattr(e, fields[s.name]) for e in encodings], dtype=s.dtype)
                for s in self.inputs}


def _text_encoder(spec: str, path: str, inputs: Sequence[InputSpec],
                  params: dict[str, str]) -> TextEncoder:
    if "tokenizer" not in params:
        raise DataError(f"'{spec}' needs a tokenizer: add ?tokenizer=PATH/tokenizer.json")
    given = Path(params["tokenizer"]).expanduser()
    candidates = [given] if given.is_absolute() else [Path(path).parent / given, given]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise DataError(f"tokenizer file not found: {given} (looked beside {path} and in the "
                        "current folder)")
    padding = params.get("padding", "longest").lower()
    if padding not in ("longest", "max_length"):
        raise DataError(f"'{spec}': padding={padding} is neither longest nor max_length")
    max_length = _int_param(spec, params, "max_length", 128)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("text data needs the tokenizers package: pip install tokenizers") \
            from None
    try:
        tokenizer = Tokenizer.from_file(str(found))
    except Exception:  # tokenizers raises a bare Exception for a bad file
        raise DataError(f"{found} is not a Hugging Face tokenizer.json") from None
    return TextEncoder(tokenizer, inputs, max_length, padding == "max_length")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class TextSource:
    """One sentence per line (blank lines skipped), tokenized; each batch padded to its longest."""

    def __init__(self, path: Path, inputs: Sequence[InputSpec], encoder: TextEncoder,
                 samples: int | None = None) -> None:
        sentences = _read_lines(path)
        if not sentences:
            raise DataError(f"{path} holds no sentences")
        self.sentences = sentences[:samples] if samples is not None else sentences
        self.encoder = encoder
        self.description = f"{len(self.sentences)} sentences from {path.name}"

    def __len__(self) -> int:
        return len(self.sentences)

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        _check_batch_size(batch_size)
        for start in range(0, len(self.sentences), batch_size):
            yield self.encoder.encode(self.sentences[start:start + batch_size])

    def labels(self) -> np.ndarray | None:
        return None


class StsbSource:
    """STS-B sentence pairs with gold similarity scores (0-5), from an `sts-*.tsv` file.

    A sample is a pair: `pairs()` yields the feeds of the first and of the second sentences of
    a batch of pairs, and `labels()` gives one gold score per pair. For calibration,
    `batches()` yields every sentence, pair by pair (s1, s2, s1, s2, ...), so `len()` counts
    sentences: twice the number of pairs.
    """

    def __init__(self, path: Path, inputs: Sequence[InputSpec], encoder: TextEncoder,
                 samples: int | None = None) -> None:
        first: list[str] = []
        second: list[str] = []
        scores: list[float] = []
        with path.open(encoding="utf-8", newline="") as handle:
            # STS-B sentences contain unbalanced quotes: the file is plain tab-separated.
            for number, row in enumerate(csv.reader(handle, delimiter="\t",
                                                    quoting=csv.QUOTE_NONE), 1):
                if not row or not "".join(row).strip():
                    continue
                try:
                    score = float(row[4])
                    a, b = row[5], row[6]
                except (IndexError, ValueError):
                    raise DataError(f"{path} line {number} is not an STS-B row (column 5 a "
                                    "score, columns 6 and 7 two sentences)") from None
                first.append(a)
                second.append(b)
                scores.append(score)
        if not scores:
            raise DataError(f"{path} holds no sentence pairs")
        stop = samples if samples is not None else len(scores)
        self.first, self.second = first[:stop], second[:stop]
        self._scores = np.array(scores[:stop], dtype=np.float64)
        self.encoder = encoder
        self.description = f"{len(self._scores)} STS-B pairs from {path.name}"

    def __len__(self) -> int:
        return 2 * len(self._scores)

    @property
    def pair_count(self) -> int:
        return len(self._scores)

    def pairs(self, batch_size: int = 32) -> Iterator[tuple[Feeds, Feeds]]:
        """Feeds for the first and the second sentences of each batch of pairs."""
        _check_batch_size(batch_size)
        for start in range(0, self.pair_count, batch_size):
            stop = start + batch_size
            yield (self.encoder.encode(self.first[start:stop]),
                   self.encoder.encode(self.second[start:stop]))

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        _check_batch_size(batch_size)
        sentences = [s for pair in zip(self.first, self.second, strict=True) for s in pair]
        for start in range(0, len(sentences), batch_size):
            yield self.encoder.encode(sentences[start:start + batch_size])

    def labels(self) -> np.ndarray | None:
        """Gold scores, one per pair (aligned with `pairs`, not with `batches`)."""
        return self._scores
