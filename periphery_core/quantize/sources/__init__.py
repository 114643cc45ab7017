"""Calibration and evaluation data: one spec string opens a source of model feeds.

A spec is `SCHEME:PATH?key=value&key=value` (the CLI's `--calib` and `--data`): `random`,
`npz:DIR` (one sample a file) or `npz:FILE` (named arrays, a leading sample axis for
several; a bare `FILE.npz` too), `npy:DIR`, `images:DIR`, `mnist:IDX_GZ`, `text:FILE` and
`stsb:TSV`. Every source
is shaped by the model's inputs, so what it yields always fits the model: right names, dtypes and
ranks, with the batch dimension first. Anything that does not fit is a `DataError` raised when the
source is opened (the first sample is checked eagerly), never a crash inside ONNX Runtime.

Key design choice: a source knows its samples one by one and stacks them into batches on
demand, so the same source serves calibration (batch 1) and evaluation (larger batches), and a
sample's content never depends on the batch size. Text is the exception: a text batch is padded
to its longest sentence, as a tokenizer does for a real batch.

Each scheme's source lives in its own module (`random_data`, `arrays`, `images`, `mnist`,
`text`, `stsb`); this package parses the spec and picks the source, and goes the other way too:
`spec_for` names the source that reads a file or folder, by the name endings in `FILE_ENDINGS`
and `FOLDER_ENDINGS` (what a file picker lists).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from periphery_core.errors import DataError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.arrays import (
    LABELS_NPY,
    ArrayFileSource,
    ArrayFolderSource,
)
from periphery_core.quantize.sources.images import IMAGE_SUFFIXES, ImageFolderSource, ImageOptions
from periphery_core.quantize.sources.mnist import MnistSource
from periphery_core.quantize.sources.options import existing_dir, existing_file
from periphery_core.quantize.sources.random_data import RandomSource
from periphery_core.quantize.sources.samples import DataSource, Feeds
from periphery_core.quantize.sources.stsb import StsbSource
from periphery_core.quantize.sources.text import TextSource, text_encoder

__all__ = [
    "DEFAULT_RANDOM_SAMPLES",
    "FILE_ENDINGS",
    "FOLDER_ENDINGS",
    "SCHEMES",
    "ArrayFileSource",
    "ArrayFolderSource",
    "DataSource",
    "Feeds",
    "ImageFolderSource",
    "MnistSource",
    "RandomSource",
    "StsbSource",
    "TextSource",
    "is_data_file",
    "open_source",
    "spec_for",
    "spec_path",
]

SCHEMES = ("random", "npz:DIR", "npz:FILE", "npy:DIR", "images:DIR", "mnist:IDX_GZ",
           "text:FILE", "stsb:TSV")
DEFAULT_RANDOM_SAMPLES = 32
# What each scheme reads, by how a file's name ends (in lower case): files that are a source on
# their own, and files that a folder source reads one sample each.
FILE_ENDINGS: dict[str, tuple[str, ...]] = {
    "npz": (".npz",), "mnist": ("idx3-ubyte", "idx3-ubyte.gz", ".idx", ".idx.gz"),
    "text": (".txt",), "stsb": (".tsv",)}
FOLDER_ENDINGS: dict[str, tuple[str, ...]] = {
    "npz": (".npz",), "npy": (".npy",), "images": IMAGE_SUFFIXES}


def open_source(
    spec: str, inputs: Sequence[InputSpec], *, samples: int | None = None, seed: int = 0
) -> DataSource:
    """Open the data source a spec string names, shaped for a model's inputs.

    Args:
        spec: `random`, `npz:DIR`, `npz:FILE` (or a bare `FILE.npz`), `npy:DIR`,
            `images:DIR?...`, `mnist:FILE?...`,
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
    spec = _with_scheme(spec)
    head, qmark, query = spec.partition("?")
    scheme, sep, path = head.partition(":")
    scheme = scheme.strip().lower()
    if not qmark:
        query = ""
    params = _parse_query(spec, query)
    openers: dict[str, Callable[[], DataSource]] = {
        "random": lambda: RandomSource(inputs, samples or DEFAULT_RANDOM_SAMPLES, seed),
        "npz": lambda: (
            ArrayFileSource(existing_file(spec, path), inputs, samples)
            if Path(path).expanduser().is_file()
            else ArrayFolderSource(existing_dir(spec, path), inputs, "npz", samples)),
        "npy": lambda: ArrayFolderSource(existing_dir(spec, path), inputs, "npy", samples),
        "images": lambda: ImageFolderSource(
            existing_dir(spec, path), inputs, ImageOptions.parse(spec, params), samples),
        "mnist": lambda: MnistSource.open(spec, existing_file(spec, path), inputs, params,
                                          samples),
        "text": lambda: TextSource(existing_file(spec, path), inputs,
                                   text_encoder(spec, path, inputs, params), samples),
        "stsb": lambda: StsbSource(existing_file(spec, path), inputs,
                                   text_encoder(spec, path, inputs, params), samples),
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


def spec_path(spec: str) -> Path | None:
    """The file or folder a spec names, or None when it names none (`random`)."""
    _, sep, path = _with_scheme(spec).partition("?")[0].partition(":")
    return Path(path.strip()).expanduser() if sep and path.strip() else None


def is_data_file(path: Path) -> bool:
    """Whether a source reads this file, on its own or as one sample of its folder."""
    endings = (*FILE_ENDINGS.values(), *FOLDER_ENDINGS.values())
    return any(path.name.lower().endswith(ends) for ends in endings)


def spec_for(path: Path) -> str | None:
    """The spec (without options) of the source that reads a file or folder; None if none does.

    A file that is a source on its own names itself (`npz:FEEDS.npz`, `mnist:IMAGES.gz`); a file
    that a folder source reads as one sample (a picture, an `.npy`) names its folder, since
    those sources read folders. A folder is read by the scheme whose files it holds most of.
    """
    name = path.name.lower()
    try:
        if path.is_dir():
            names = [p.name.lower() for p in path.iterdir() if p.name != LABELS_NPY]
            counts = {scheme: sum(n.endswith(ends) for n in names)
                      for scheme, ends in FOLDER_ENDINGS.items()}
            best = max(counts, key=counts.__getitem__)  # the first of equals
            return f"{best}:{path}" if counts[best] else None
    except OSError:  # a folder we may not read: no source reads it either
        return None
    scheme = next((s for s, ends in FILE_ENDINGS.items() if name.endswith(ends)), None)
    if scheme is not None:
        return f"{scheme}:{path}"
    if any(name.endswith(ends) for ends in FOLDER_ENDINGS.values()):
        return spec_for(path.parent)
    return None


def _with_scheme(spec: str) -> str:
    if spec.strip().lower().endswith(".npz") and ":" not in spec:
        return f"npz:{spec.strip()}"  # a bare file of feeds, as --inputs takes
    return spec


def _parse_query(spec: str, query: str) -> dict[str, str]:
    # Split by hand rather than with urllib: '+' and '%' in paths must stay as written.
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise DataError(f"'{spec}': option '{part}' is not KEY=VALUE")
        params[key.strip().lower()] = value.strip()
    return params
