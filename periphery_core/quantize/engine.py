"""What the quantization engines share: calibration batches, the run contract, model files.

Every engine (`ort_engine`, `inc_engine`) runs one config as a `Runner`: it gets the model with
every node named, a temporary folder, the calibration source and the progress and cancel hooks,
and returns the quantized model, notes for humans and the names of the tensors it calibrated
on. Quantizers read paths, so a model is written into the folder first (`prepared_model`) and
the result read back (`read_model`).

Design choices, measured on the corpus:
- Pre-processing (static QDQ and SmoothQuant) is `quant_pre_process` with shape inference
  only. ORT's graph optimisation step fuses Add into Conv on mnist-8, after which the static
  quantizer crashes (a bias-scale ValueError), and fusions rename nodes so exclusions stop
  matching; shape inference alone gives the same INT8 accuracy (98.91% on mnist-8).
- Static QDQ needs opset 13 for per-channel weights: older models are converted first.
- Calibration data arrive through `FeedSource.batches()`; the reader adapter reports progress
  per batch and checks the cancel token before each, so a cancelled calibration stops at the
  next batch with `Cancelled`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from periphery_core.model.loading import EXTERNAL_DATA_THRESHOLD, approx_size, save_model
from periphery_core.progress import CancelToken, ProgressFn, check, report
from periphery_core.quantize.config import QuantConfig, QuantizeError

QDQ_MIN_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights) arrived in opset 13
ORT_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class FeedSource(Protocol):
    """What quantization needs from a calibration data source: batches of model feeds."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]: ...


RunResult = tuple[onnx.ModelProto, list[str], tuple[str, ...]]
"""What an engine returns: the quantized model, notes for humans, the calibrated tensors."""

Runner = Callable[
    [onnx.ModelProto, QuantConfig, FeedSource | None, Path, ProgressFn | None,
     CancelToken | None],
    RunResult,
]


class CalibrationReader:
    """Adapts a `FeedSource` to ORT's and INC's calibration reader protocol.

    It hands out at most `samples` samples in batches of `batch_size`, keeps only the feeds the
    model reads, reports progress per batch and checks `cancel` before each. `rewind()` starts
    a new pass (INC makes several); a deep copy (ORT's GPTQ takes one) is a fresh reader over
    the same source, since progress callbacks and cancel tokens must not be copied.
    """

    def __init__(
        self,
        source: FeedSource,
        input_names: Sequence[str],
        *,
        samples: int,
        batch_size: int,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
        task: str = "calibrate",
    ) -> None:
        self.source = source
        self.input_names = tuple(input_names)
        self.samples = samples
        self.batch_size = batch_size
        self.progress = progress
        self.cancel = cancel
        self.task = task
        self.seen_names: dict[str, None] = {}
        self.batches_read = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._given = 0

    @property
    def total(self) -> int:
        try:
            available = len(self.source)
        except TypeError:
            available = self.samples
        return max(1, min(self.samples, available))

    def get_next(self) -> dict[str, np.ndarray] | None:
        check(self.cancel)
        if self._given >= self.samples:
            return None
        if self._it is None:
            self._it = iter(self.source.batches(self.batch_size))
        batch = next(self._it, None)
        if batch is None:
            return None
        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise QuantizeError(
                f"the calibration data have no input '{missing[0]}' (they have: "
                f"{', '.join(sorted(batch)) or 'nothing'})"
            )
        feeds = {n: np.asarray(batch[n]) for n in self.input_names}
        self.seen_names.update(dict.fromkeys(feeds))
        first = next(iter(feeds.values()), None)
        self._given += int(first.shape[0]) if first is not None and first.ndim else 1
        self.batches_read += 1
        report(self.progress, self.task, min(self._given, self.total), self.total,
               f"batch {self.batches_read}")
        return feeds

    def rewind(self) -> None:
        self._it = None
        self._given = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds

    def __deepcopy__(self, memo: dict[int, Any]) -> CalibrationReader:
        return CalibrationReader(
            self.source, self.input_names, samples=self.samples, batch_size=self.batch_size,
            progress=self.progress, cancel=self.cancel, task=self.task,
        )


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model must be written with external data (over protobuf's 2 GB)."""
    return approx_size(model) >= EXTERNAL_DATA_THRESHOLD


def write_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write the model for a quantizer to read (external data beside it when large)."""
    save_model(model, path)
    return path


def read_model(path: Path) -> onnx.ModelProto:
    """Read a quantizer's output back, weights loaded (raises `QuantizeError`)."""
    try:
        return onnx.load(str(path))  # loads external data from beside the file
    except Exception as exc:
        raise QuantizeError(
            f"the quantized model could not be read back: {first_line(exc)}"
        ) from None


def first_line(exc: BaseException) -> str:
    """A quantizer's exception as one line for humans."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "input array dimensions" in line:  # INC stacks calibration batches along axis 0
        return ("its calibration batches differ in shape; give them one shape (for text "
                "sources add padding=max_length to --calib)")
    return line[:240]


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """The model's real inputs (initializers listed as inputs left out)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 when it declares none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@contextlib.contextmanager
def quiet_root_logging() -> Iterator[None]:
    """ORT's MatMulNBits module calls `logging.basicConfig(level=INFO)` on import: undo that.
    Its quantizers also warn on the root logger to "consider pre-processing", advice for their
    own scripts that a Periphery user cannot act on: drop it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    advice = _DropAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def prepared_model(
    model: onnx.ModelProto, tmp: Path, notes: list[str], min_opset: int = 0,
    infer_shapes: bool = True,
) -> Path:
    """Write `model` for a quantizer: opset raised to `min_opset`, shapes inferred."""
    if min_opset and 0 < opset_of(model) < min_opset:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, min_opset)
        except Exception as exc:
            raise QuantizeError(
                f"the model's opset {opset_of(model)} is too old for QDQ quantization and could "
                f"not be converted to opset {min_opset}: {first_line(exc)}"
            ) from None
        notes.append(f"converted to opset {min_opset}")
    if min_opset and model.ir_version < 7:
        model = _modern_ir(model)
    raw = write_model(model, tmp / "model.onnx")
    if not infer_shapes:
        return raw
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    large = is_large(model)
    # ONNX shape inference only. ORT's symbolic inference gives up on MiniLM ("Incomplete
    # symbolic shape inference") and then dumps the model into the working directory; with
    # auto_merge it rewrote a MiniLM shard's mask input from [b, 1, s, s] to [b, 12, s, s].
    # The quantized graphs were the same either way.
    try:
        quant_pre_process(
            str(raw), str(pre), skip_optimization=True, skip_symbolic_shape=True,
            save_as_external_data=large, all_tensors_to_one_file=True,
            external_data_location="pre.onnx.data" if large else None,
        )
    except Exception as exc:
        notes.append(f"pre-processing skipped ({first_line(exc)[:80]})")
        return raw
    return pre


def _modern_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR 7 (what opset 13 needs), initializers no longer listed among the graph inputs.

    IR 3 models list every weight as an input too; INC's SmoothQuant rescales weights and then
    trips over the stale input declarations ("Can't merge shape info" on mnist-8).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name for i in out.graph.initializer}
    keep = [i for i in out.graph.input if i.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    out.ir_version = 7
    return out
