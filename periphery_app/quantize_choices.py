"""What the Quantize wizard asks and how it says it: the choices as typed in, the core config
they make, and the words for each method and data source.

Design choice: the wizard decides nothing about methods. Which widths a method has, which engine
does a width and what a method needs to install are the core's (`METHOD_LIST` in
`periphery_core.quantize.config`); this module only puts them into words, and `build_config`
hands the choices to `method_config`, which validates them as it does the CLI's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

from periphery_app.control import OpenedModel
from periphery_core.quantize.config import (
    Engine,
    Method,
    QuantConfig,
    install_hint,
    method_config,
    method_info,
    missing_extra,
)
from periphery_core.quantize.sources import spec_for, spec_path


@dataclass(frozen=True, slots=True)
class Choices:
    """Everything the wizard asks, as typed in; `build_config` validates it."""

    method: str = "static"
    bits: int | None = None  # None: the method's default
    calib_spec: str = "random"
    calib_samples: int | None = None  # None: the method's default
    eval_spec: str = ""  # blank: the calibration data
    eval_samples: int | None = None  # None: all of them (32 for random)
    per_channel: bool | None = None  # None: the method's default
    calibration: str | None = None  # minmax, entropy, percentile; None: the method's default

    @property
    def engine(self) -> Engine:
        """The engine that quantizes the method to the chosen width (the core decides)."""
        return method_info(self.method).engine_for(self.bits)

    @property
    def evaluation_spec(self) -> str:
        return self.eval_spec or self.calib_spec

    @property
    def evaluation_samples(self) -> int | None:
        """Evaluation on the calibration data takes as many samples as calibration did."""
        return self.eval_samples if self.eval_spec else self.eval_samples or self.calib_samples


def settings_of(method: str) -> set[str]:
    """The settings the method's default config has (what the options step may offer)."""
    return {f.name for f in dataclasses.fields(type(method_config(method)))}


def build_config(choices: Choices) -> QuantConfig:
    """The core config for the wizard's choices (settings a method lacks are left out).

    Raises:
        QuantizeError: bits the method cannot do, or a bad setting.
    """
    known = settings_of(choices.method)
    common: dict[str, object] = {}
    if choices.calib_samples is not None and "samples" in known:
        common["samples"] = choices.calib_samples
    if choices.per_channel is not None and "per_channel" in known:
        common["per_channel"] = choices.per_channel
    if choices.calibration is not None and "calibration" in known:
        common["calibration"] = choices.calibration
    return method_config(choices.method, choices.bits, engine=choices.engine, **common)


def _spoken(numbers: tuple[int, ...]) -> str:
    """`(2, 3, 8)` as "2, 3 and 8"."""
    words = [str(n) for n in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _inc_only_bits(method: Method) -> tuple[int, ...]:
    """The widths of a method that ONNX Runtime also has which only Neural Compressor does."""
    if not method.ort_bits:
        return ()
    return tuple(b for b in method.inc_bits if b not in method.ort_bits)


def method_needs(method: Method) -> str:
    """What a method runs on, as the method list shows it: "torch; 2/3/8 bits: 'inc'"."""
    if not method.ort_bits:
        return "Neural Compressor ('inc')"
    needs = method.needs[0] if method.needs is not None else "ONNX Runtime"
    others = _inc_only_bits(method)
    return f"{needs}; {'/'.join(map(str, others))} bits: 'inc'" if others else needs


def bits_label(method: Method) -> str:
    """The title of the weight-width choice, saying which engine does which width."""
    others = _inc_only_bits(method)
    if not others:
        return "Weight bits"
    return (f"Weight bits ({_spoken(method.ort_bits)} on ONNX Runtime; "
            f"{_spoken(others)} on Neural Compressor)")


def method_prompt(name: str) -> Text:
    """One line of the method list: the name, what it does, and what it needs (in yellow with
    the install command when its extra is missing here: said before the user picks it)."""
    method = method_info(name)
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"{name:<12}", style="bold")
    text.append(f"{method.summary:<48}")
    extra = missing_extra(name)
    if extra is not None:
        text.append(f"not installed: {install_hint(extra)}", style="yellow")
    else:
        text.append(method_needs(method), style="dim")
    return text


def data_hints(opened: OpenedModel) -> list[tuple[str, str]]:
    """Data source specs that fit the open model, with what each is (the schemes of
    `quantize.sources`, filled in where the model says how: image size, tokenizer)."""
    hints = [("random", "seeded random inputs (a smoke test, not accuracy)"),
             ("npz:FEEDS.npz", "named arrays, as --inputs; a leading axis for several"),
             ("npz:DIR  or  npy:DIR", "one sample per file")]
    tensors = [s for s in opened.analysis.inputs if s.kind == "tensor"]
    if len(tensors) == 1 and len(tensors[0].shape) == 4 and tensors[0].dtype.kind == "f":
        _, channels, height, width = tensors[0].shape
        if (channels, height, width) == (1, 28, 28):
            hints.append(("mnist:IMAGES.idx.gz?range=0:200", "MNIST digits (labels beside)"))
        hints.append((f"images:DIR?size={height}x{width}", f"photos, resized to "
                      f"{height}x{width}; labels.txt gives accuracy"))
    tokenizer = _tokenizer(opened)
    if tokenizer is not None:
        hints.append((f"text:FILE?tokenizer={tokenizer}", "one sentence a line"))
        hints.append((f"stsb:TSV?tokenizer={tokenizer}", "STS-B pairs with gold scores"))
    return hints


def _tokenizer(opened: OpenedModel) -> Path | None:
    """The tokenizer beside the model, which text data for it is tokenized with."""
    path = opened.loaded.path.parent / "tokenizer.json"
    return path if path.is_file() else None


def picker_folder(spec: str, opened: OpenedModel) -> Path:
    """Where the file picker opens: the folder of the data the spec names, else the model's."""
    path = spec_path(spec)
    for folder in (path, path.parent) if path is not None else ():
        if folder.is_dir():
            return folder
    return opened.loaded.path.parent


def picked_spec(path: Path, opened: OpenedModel) -> str | None:
    """The spec for a file or folder picked for the model (`quantize.sources.spec_for`, with
    the tokenizer beside the model for text data); None when no source reads it."""
    spec = spec_for(path)
    tokenizer = _tokenizer(opened)
    if spec is not None and tokenizer is not None and spec.startswith(("text:", "stsb:")):
        return f"{spec}?tokenizer={tokenizer}"
    return spec
