"""Quantization settings: one frozen, typed config per method, validated when built.

A config names one method of one engine and nothing else: there are no option dicts with string
keys. ONNX Runtime's own quantizers (`DynamicInt8`, `StaticInt8`, `WeightOnly4Bit`) always work;
the `Inc*` configs need Intel Neural Compressor's ONNX package (`onnx-neural-compressor`, the
optional extra `inc`), which is imported only when such a config is run.

`method_config` turns the CLI's method names into configs. The mapping:

| CLI name      | bits      | engine "auto"/"ort"        | engine "inc"                  |
|---------------|-----------|----------------------------|-------------------------------|
| `dynamic`     | 8 (None)  | `DynamicInt8`              | refused (ORT only)            |
| `static`      | 8 (None)  | `StaticInt8`               | refused (ORT only)            |
| `rtn`         | 4 (None)  | `WeightOnly4Bit("rtn")`    | `IncRtn(bits)` (2, 3, 4, 8)   |
| `gptq`        | 4 (None)  | `WeightOnly4Bit("gptq")`   | `IncGptq(bits)` (2, 3, 4, 8)  |
| `hqq`         | 4 (None)  | `WeightOnly4Bit("hqq")`    | refused (ORT only)            |
| `awq`         | 4 (None)  | "auto": `IncAwq`; "ort" refused | `IncAwq(bits)`           |
| `smoothquant` | 8 (None)  | "auto": `IncSmoothQuant`; "ort" refused | `IncSmoothQuant`  |

So "auto" picks ONNX Runtime wherever it has the method (no extra install needed) and Intel
Neural Compressor only for AWQ and SmoothQuant, which ONNX Runtime lacks. `METHOD_LIST` is the
one list of these names with the widths each engine does: `method_config` checks by it, and the
CLI's choices and the app's wizard read it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union, get_args

from periphery_core.errors import QuantizeError

CalibrationMethod = Literal["minmax", "entropy", "percentile"]
IntType = Literal["int8", "uint8"]
WeightOnlyMethod = Literal["rtn", "gptq", "hqq"]
Scheme = Literal["sym", "asym"]
Engine = Literal["auto", "ort", "inc"]

CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = get_args(CalibrationMethod)
INC_BITS = (2, 3, 4, 8)


def _one_of(what: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed)
        raise QuantizeError(f"{what} must be one of {shown}, got {value!r}")


def _positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QuantizeError(f"{what} must be a positive whole number, got {value!r}")


def _names(what: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise QuantizeError(f"{what} must be a tuple of node names, got {value!r}")


def _group_size(value: object) -> None:
    # -1 means one group per column (per-channel) for Intel Neural Compressor.
    if isinstance(value, bool) or not isinstance(value, int) or not (
        value == -1 or (value >= 16 and value & (value - 1) == 0)
    ):
        raise QuantizeError(
            f"group size must be a power of two of at least 16 (or -1 for per-channel), "
            f"got {value!r}"
        )


@dataclass(frozen=True, slots=True)
class DynamicInt8:
    """INT8 weights, activations quantized at run time (ONNX Runtime `quantize_dynamic`)."""

    per_channel: bool = False
    reduce_range: bool = False
    weight_type: IntType = "int8"
    op_types: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    method: ClassVar[str] = "dynamic"
    engine: ClassVar[str] = "ort"
    calibrated: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _one_of("weight type", self.weight_type, ("int8", "uint8"))
        if self.op_types is not None:
            _names("op types", self.op_types)
        _names("exclude", self.exclude)


@dataclass(frozen=True, slots=True)
class StaticInt8:
    """INT8 weights and activations in QDQ form, ranges calibrated on sample inputs."""

    calibration: CalibrationMethod = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    activation_type: IntType = "uint8"
    weight_type: IntType = "int8"
    samples: int = 100
    batch_size: int = 1
    exclude: tuple[str, ...] = ()

    method: ClassVar[str] = "static"
    engine: ClassVar[str] = "ort"
    calibrated: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _one_of("calibration", self.calibration, CALIBRATION_METHODS)
        if not isinstance(self.percentile, int | float) or not (
            math.isfinite(self.percentile) and 50.0 < self.percentile <= 100.0
        ):
            raise QuantizeError(f"percentile must be above 50 and at most 100, "
                                f"got {self.percentile!r}")
        _one_of("activation type", self.activation_type, ("int8", "uint8"))
        _one_of("weight type", self.weight_type, ("int8", "uint8"))
        _positive_int("samples", self.samples)
        _positive_int("batch size", self.batch_size)
        _names("exclude", self.exclude)


@dataclass(frozen=True, slots=True)
class WeightOnly4Bit:
    """4-bit blockwise MatMul weights (ONNX Runtime `MatMulNBitsQuantizer`, MatMulNBits ops).

    `rtn` rounds to nearest and needs nothing extra; `gptq` (calibrated on `samples` inputs) and
    `hqq` need torch.
    """

    method: WeightOnlyMethod = "rtn"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    samples: int = 32  # gptq only
    exclude: tuple[str, ...] = ()

    engine: ClassVar[str] = "ort"

    def __post_init__(self) -> None:
        _one_of("weight-only method", self.method, ("rtn", "gptq", "hqq"))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or (
            self.block_size < 16 or self.block_size & (self.block_size - 1)
        ):
            raise QuantizeError(
                f"block size must be a power of two of at least 16, got {self.block_size!r}"
            )
        if self.accuracy_level is not None:
            _one_of("accuracy level", self.accuracy_level, (0, 1, 2, 3, 4))
        _positive_int("samples", self.samples)
        _names("exclude", self.exclude)

    @property
    def calibrated(self) -> bool:
        return self.method == "gptq"


@dataclass(frozen=True, slots=True)
class IncRtn:
    """Intel Neural Compressor round-to-nearest weight-only quantization (MatMulNBits)."""

    bits: int = 4
    group_size: int = 32
    scheme: Scheme = "sym"
    exclude: tuple[str, ...] = ()

    method: ClassVar[str] = "rtn"
    engine: ClassVar[str] = "inc"
    calibrated: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _one_of("bits", self.bits, INC_BITS)
        _group_size(self.group_size)
        _one_of("scheme", self.scheme, ("sym", "asym"))
        _names("exclude", self.exclude)


@dataclass(frozen=True, slots=True)
class IncGptq:
    """Intel Neural Compressor GPTQ weight-only quantization, calibrated on sample inputs."""

    bits: int = 4
    group_size: int = 32
    scheme: Scheme = "asym"
    samples: int = 32
    batch_size: int = 1
    percdamp: float = 0.01
    act_order: bool = False
    exclude: tuple[str, ...] = ()

    method: ClassVar[str] = "gptq"
    engine: ClassVar[str] = "inc"
    calibrated: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _one_of("bits", self.bits, INC_BITS)
        _group_size(self.group_size)
        _one_of("scheme", self.scheme, ("sym", "asym"))
        _positive_int("samples", self.samples)
        _positive_int("batch size", self.batch_size)
        if not isinstance(self.percdamp, int | float) or not 0.0 < self.percdamp < 1.0:
            raise QuantizeError(f"percdamp must be between 0 and 1, got {self.percdamp!r}")
        _names("exclude", self.exclude)


@dataclass(frozen=True, slots=True)
class IncAwq:
    """Intel Neural Compressor AWQ (activation-aware weight scaling), calibrated."""

    bits: int = 4
    group_size: int = 32
    scheme: Scheme = "asym"
    samples: int = 32
    batch_size: int = 1
    exclude: tuple[str, ...] = ()

    method: ClassVar[str] = "awq"
    engine: ClassVar[str] = "inc"
    calibrated: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _one_of("bits", self.bits, INC_BITS)
        _group_size(self.group_size)
        _one_of("scheme", self.scheme, ("sym", "asym"))
        _positive_int("samples", self.samples)
        _positive_int("batch size", self.batch_size)
        _names("exclude", self.exclude)


@dataclass(frozen=True, slots=True)
class IncSmoothQuant:
    """Intel Neural Compressor SmoothQuant followed by static INT8 (QDQ), calibrated."""

    alpha: float = 0.5
    samples: int = 100
    batch_size: int = 1
    calibration: CalibrationMethod = "minmax"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()

    method: ClassVar[str] = "smoothquant"
    engine: ClassVar[str] = "inc"
    calibrated: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            raise QuantizeError(f"alpha must be between 0 and 1, got {self.alpha!r}")
        _positive_int("samples", self.samples)
        _positive_int("batch size", self.batch_size)
        _one_of("calibration", self.calibration, CALIBRATION_METHODS)
        _names("exclude", self.exclude)


QuantConfig = Union[  # noqa: UP007  (a runtime alias, also used in isinstance checks)
    DynamicInt8, StaticInt8, WeightOnly4Bit, IncRtn, IncGptq, IncAwq, IncSmoothQuant
]
CONFIG_TYPES: tuple[type, ...] = (
    DynamicInt8, StaticInt8, WeightOnly4Bit, IncRtn, IncGptq, IncAwq, IncSmoothQuant
)


@dataclass(frozen=True, slots=True)
class Method:
    """A method name as the CLI and the app offer it: what it does, the weight widths each
    engine quantizes it to (none: the engine lacks the method), and what it needs beyond the
    base install."""

    name: str
    summary: str
    default_bits: int  # the width when none is asked for, on the engine "auto" picks
    ort_bits: tuple[int, ...] = ()
    inc_bits: tuple[int, ...] = ()
    needs: tuple[str, str] | None = None  # (package, extra) its default engine imports

    @property
    def bits(self) -> tuple[int, ...]:
        """Every width some engine quantizes this method to, smallest first."""
        return tuple(sorted({*self.ort_bits, *self.inc_bits}))

    def engine_for(self, bits: int | None) -> Engine:
        """The engine to ask for `bits` (None: the default width): "inc" where only Intel
        Neural Compressor does that width of a method ONNX Runtime also has, else "auto"."""
        if self.ort_bits and bits not in (None, *self.ort_bits) and bits in self.inc_bits:
            return "inc"
        return "auto"


METHOD_LIST = (
    Method("dynamic", "INT8 weights, activations quantized at run time", 8, ort_bits=(8,)),
    Method("static", "INT8 weights and activations (QDQ), calibrated", 8, ort_bits=(8,)),
    Method("rtn", "4-bit MatMul weights, round to nearest", 4, ort_bits=(4,),
           inc_bits=INC_BITS),
    Method("gptq", "4-bit MatMul weights, calibrated (GPTQ)", 4, ort_bits=(4,),
           inc_bits=INC_BITS, needs=("torch", "quantize-gptq")),
    Method("hqq", "4-bit MatMul weights, half-quadratic", 4, ort_bits=(4,),
           needs=("torch", "quantize-gptq")),
    Method("awq", "weight-only, activation-aware scaling", 4, inc_bits=INC_BITS,
           needs=("onnx_neural_compressor", "inc")),
    Method("smoothquant", "INT8 after smoothing the activations", 8, inc_bits=(8,),
           needs=("onnx_neural_compressor", "inc")),
)
METHODS = tuple(m.name for m in METHOD_LIST)
_BY_NAME = {m.name: m for m in METHOD_LIST}
# The config each engine builds for a method; its keys are the methods that engine has.
_ORT_CONFIGS: dict[str, type] = {"dynamic": DynamicInt8, "static": StaticInt8,
                                 "rtn": WeightOnly4Bit, "gptq": WeightOnly4Bit,
                                 "hqq": WeightOnly4Bit}
_INC_CONFIGS: dict[str, type] = {"rtn": IncRtn, "gptq": IncGptq, "awq": IncAwq,
                                 "smoothquant": IncSmoothQuant}


def method_info(method: str) -> Method:
    """The entry of `METHOD_LIST` for a method name.

    Raises:
        QuantizeError: no method of that name.
    """
    _one_of("method", method, METHODS)
    return _BY_NAME[method]


# How to install an extra where `pip install 'periphery[EXTRA]'` alone would mislead: Intel
# Neural Compressor's ONNX package pins numpy<2, which the rest of an environment may not take.
_INSTALL = {"inc": "pip install 'periphery[inc]' into an environment of its own (it pins "
                   "numpy<2)"}


def install_hint(extra: str) -> str:
    """How to install one of the project's extras, in one line."""
    return _INSTALL.get(extra, f"pip install 'periphery[{extra}]'")


def missing_extra(method: str) -> str | None:
    """The extra to install before `method` can run here (by its default engine), or None."""
    import importlib.util

    need = method_info(method).needs
    if need is None or importlib.util.find_spec(need[0]) is not None:
        return None
    return need[1]


def weight_bits(config: QuantConfig) -> int:
    """The weight width a config quantizes to."""
    bits = getattr(config, "bits", None)
    return bits if isinstance(bits, int) else method_info(config.method).default_bits


def with_exclude(config: QuantConfig, nodes: tuple[str, ...]) -> QuantConfig:
    """The same config with `nodes` added to its excluded nodes (order kept, no repeats)."""
    merged = tuple(dict.fromkeys((*config.exclude, *nodes)))
    return dataclasses.replace(config, exclude=merged)


def method_config(
    method: str, bits: int | None = None, *, engine: Engine = "auto", **common: Any
) -> QuantConfig:
    """The config for a CLI method name (see the module docstring for the mapping).

    Args:
        method: dynamic, static, rtn, gptq, hqq, awq or smoothquant.
        bits: weight bits; None takes the method's default (8 for INT8 methods, 4 otherwise).
        engine: "auto" (ONNX Runtime where it has the method), "ort" or "inc".
        **common: fields of the chosen config (e.g. `exclude`, `samples`, `block_size`).

    Raises:
        QuantizeError: unknown method or engine, bits the method cannot do, or a field the
            chosen config does not have.
    """
    info = method_info(method)
    _one_of("engine", engine, get_args(Engine))
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
        raise QuantizeError(f"bits must be a whole number, got {bits!r}")
    if "exclude" in common and isinstance(common["exclude"], list):
        common["exclude"] = tuple(common["exclude"])
    if not info.ort_bits and engine == "ort":
        raise QuantizeError(f"method {method} exists only in Intel Neural Compressor: "
                            f"use engine 'inc' ({install_hint('inc')})")
    if not info.inc_bits and engine == "inc":
        raise QuantizeError(f"method {method} runs on ONNX Runtime's quantizer only: "
                            "use engine 'ort' or 'auto'")
    use_inc = engine == "inc" or not info.ort_bits
    widths = info.inc_bits if use_inc else info.ort_bits
    chosen = info.default_bits if bits is None else bits
    if chosen not in widths:
        if len(info.bits) == 1:
            raise QuantizeError(f"method {method} quantizes to {info.bits[0]} bits, not {bits}")
        if use_inc:
            raise QuantizeError(f"method {method} (Intel Neural Compressor) takes bits "
                                f"{', '.join(map(str, widths))}, not {bits}")
        raise QuantizeError(f"method {method} on ONNX Runtime quantizes weights to "
                            f"{', '.join(map(str, widths))} bits, not {bits}: use engine 'inc' "
                            "for other widths")
    cls = (_INC_CONFIGS if use_inc else _ORT_CONFIGS)[method]
    names = {f.name for f in dataclasses.fields(cls)}
    fields: dict[str, Any] = {}
    if cls is WeightOnly4Bit:  # one config for ONNX Runtime's three weight-only methods
        fields["method"] = method
    if "bits" in names:
        fields["bits"] = chosen
    known = names - set(fields)
    unknown = sorted(set(common) - known)
    if unknown:
        raise QuantizeError(f"method {method} has no setting '{unknown[0]}' "
                            f"(it has: {', '.join(sorted(known))})")
    config: QuantConfig = cls(**fields, **common)
    return config
