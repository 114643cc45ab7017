"""`images:DIR`: JPEG and PNG pictures as one float image input (Pillow, imported on use)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from periphery_core.errors import DataError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.options import floats_param
from periphery_core.quantize.sources.samples import Feeds, SampleSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
        scale = floats_param(spec, params, "scale", 255.0)
        if len(scale) != 1:
            raise DataError(f"'{spec}': scale takes one number")
        return cls(size, layout, floats_param(spec, params, "mean", 0.0),
                   floats_param(spec, params, "std", 1.0), float(scale[0]), gray)


class ImageFolderSource(SampleSource):
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
