"""Input shapes: parsing `NAME=1x3x224x224` and resolving symbolic dimensions.

Symbolic dimensions are resolved by name across all inputs, so `batch` gets one value everywhere.
A dimension with no name (`?`, empty, or a negative `dim_value` such as paddle2onnx's -1) is
symbolic too, private to its input and position (`x:0`). User-given shapes win, then what the
model declares about itself (`model.declared`: a GenAI or Hugging Face config beside it, export
metadata); a dimension neither gives defaults to 1, except cache lengths (names containing
`past`), which default to 0: an empty KV cache. Names that are sums such as
`past_sequence_length + 1` are computed from their parts. Defaults are reported as notes so a
user sees what was assumed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from periphery_core.errors import InputShapeError

if TYPE_CHECKING:
    from periphery_core.model.loading import LoadedModel

_BATCH_LIKE = re.compile(r"batch|^n$|^b$|^unk__|^N$", re.IGNORECASE)


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse `NAME=1x3x224x224` (or `NAME=` for a scalar) into a name and a shape."""
    name, sep, dims = spec.rpartition("=")
    if not sep or not name:
        raise InputShapeError(
            f"input shape '{spec}' is not NAME=DIMS (for example images=1x3x224x224)"
        )
    dims = dims.strip()
    if not dims:
        return name, ()
    try:
        shape = tuple(int(d) for d in re.split(r"[x,]", dims))
    except ValueError:
        raise InputShapeError(
            f"input shape '{spec}': dimensions must be integers joined by 'x', like 1x3x224x224"
        ) from None
    if any(d < 0 for d in shape):
        raise InputShapeError(f"input shape '{spec}': dimensions cannot be negative")
    return name, shape


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    return dict(parse_input_shape(s) for s in specs)


def is_fixed(d: onnx.TensorShapeProto.Dimension) -> bool:
    """A dimension with a real size: `dim_value` set and not negative (paddle2onnx writes -1)."""
    return d.HasField("dim_value") and d.dim_value >= 0


def dim_symbol(d: onnx.TensorShapeProto.Dimension, input_name: str, index: int) -> str:
    """The name a non-fixed dimension is known by: its `dim_param`, or `input:index` if it has
    none (or a placeholder such as `?`)."""
    name = d.dim_param.strip()
    if not name or name in ("?", "-1", "None", "unk"):
        return f"{input_name}:{index}"
    return name


_SUM = re.compile(r"^\s*([A-Za-z_][\w]*)\s*([+-])\s*(\d+)\s*$")


def _derived(sym: str, symbols: Mapping[str, int]) -> int | None:
    """The value of a name like `past_sequence_length + 1` once its base is known."""
    m = _SUM.match(sym)
    if m is None or m.group(1) not in symbols:
        return None
    base, sign, k = symbols[m.group(1)], m.group(2), int(m.group(3))
    return max(0, base + k if sign == "+" else base - k)


def is_batch_like(sym: str) -> bool:
    return bool(_BATCH_LIKE.search(sym))


@dataclass(frozen=True, slots=True)
class InputSpec:
    """A model input with its dtype and a concrete shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    kind: str = "tensor"  # or "sequence": a list of tensors of `dtype`; shape is then ()


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (IR < 4 lists both)."""
    inits = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def elem_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def resolve_input_shapes(
    model: onnx.ModelProto | LoadedModel,
    given: Mapping[str, Sequence[int]] | None = None,
    declared: Mapping[str, int] | None = None,
) -> tuple[list[InputSpec], list[str]]:
    """Concrete shapes for every model input, and notes on what was defaulted.

    Args:
        model: the model; a `LoadedModel` brings what it declares about its dimensions.
        given: shapes the user gave, per input name.
        declared: symbolic dimension values the model declares (overrides a LoadedModel's).

    Raises:
        InputShapeError: a given name is not an input, or a shape has the wrong rank or
            contradicts a fixed dimension.
    """
    sums: Mapping[str, tuple[str, ...]] = {}
    if not isinstance(model, onnx.ModelProto):  # a LoadedModel
        sums = model.declared.sums
        declared = model.declared.dims if declared is None else declared
        model = model.proto
    declared = dict(declared or {})
    given = dict(given or {})
    inputs = graph_inputs(model)
    names = [vi.name for vi in inputs]
    symbols = _dimension_sizes(inputs, names, given)
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputShapeError(
            f"'{unknown[0]}' is not an input of this model nor one of its symbolic dimensions; "
            f"its inputs are: {', '.join(names)}"
        )
    for vi in inputs:
        if vi.name not in given:
            continue
        dims_of = vi.type.tensor_type.shape.dim
        shape = tuple(given[vi.name])
        if vi.type.tensor_type.HasField("shape") and len(dims_of) != len(shape):
            raise InputShapeError(
                f"input '{vi.name}' has rank {len(dims_of)} but the given shape "
                f"{'x'.join(map(str, shape)) or '(scalar)'} has rank {len(shape)}"
            )
        for i, (d, v) in enumerate(zip(dims_of, shape, strict=False)):
            if is_fixed(d):
                if d.dim_value != v:
                    raise InputShapeError(
                        f"input '{vi.name}' dimension {i} is fixed at {d.dim_value}, "
                        f"but the given shape says {v}"
                    )
                continue
            sym = dim_symbol(d, vi.name, i)
            if symbols.setdefault(sym, v) != v:
                raise InputShapeError(
                    f"dimension '{sym}' is {symbols[sym]} in one given shape "
                    f"and {v} in the shape of '{vi.name}': give it one value"
                )
    notes: list[str] = []

    def value(sym: str, input_name: str) -> int:
        if sym not in symbols:
            m = _SUM.match(sym)
            if m is not None:  # `past_sequence_length + 1`: from its base, whatever order
                value(m.group(1), input_name)
                symbols[sym] = _derived(sym, symbols) or 0
            elif sym in declared:
                symbols[sym] = declared[sym]
            elif sym in sums:
                symbols[sym] = sum(value(part, input_name) for part in sums[sym])
            else:
                default = 0 if "past" in sym.lower() else 1
                symbols[sym] = default
                kind = "batch-like" if is_batch_like(sym) else "symbolic"
                notes.append(
                    f"{kind} dimension '{sym}' defaulted to {default}; set it with "
                    f"--input-shape {input_name}=..."
                )
        return symbols[sym]

    specs: list[InputSpec] = []
    for vi in inputs:
        tt = vi.type.tensor_type
        seq = vi.type.sequence_type.elem_type
        if vi.type.HasField("sequence_type") and seq.HasField("tensor_type"):
            if vi.name in given:
                raise InputShapeError(f"input '{vi.name}' is a sequence of tensors: it has no "
                                      "single shape to give")
            specs.append(InputSpec(vi.name, elem_dtype(seq.tensor_type.elem_type), (),
                                   "sequence"))
            continue
        if not vi.type.HasField("tensor_type"):
            raise InputShapeError(f"input '{vi.name}' is not a tensor or a sequence of tensors")
        dtype = elem_dtype(tt.elem_type)
        if vi.name in given:
            specs.append(InputSpec(vi.name, dtype, tuple(given[vi.name])))
            continue
        dims = [d.dim_value if is_fixed(d) else value(dim_symbol(d, vi.name, i), vi.name)
                for i, d in enumerate(tt.shape.dim)]
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs, notes


def _dimension_sizes(inputs: Sequence[onnx.ValueInfoProto], names: Sequence[str],
                     given: dict[str, Sequence[int]]) -> dict[str, int]:
    """Given entries that name a symbolic dimension rather than an input
    (`past_sequence_length=16`): taken out of `given` and returned as that dimension's size."""
    dims = {dim_symbol(d, vi.name, i) for vi in inputs
            for i, d in enumerate(vi.type.tensor_type.shape.dim) if not is_fixed(d)}
    sizes: dict[str, int] = {}
    for name in [n for n in given if n not in names and n in dims]:
        shape = tuple(given.pop(name))
        if len(shape) != 1:
            raise InputShapeError(f"'{name}' is a dimension: give it one size, like {name}=16")
        sizes[name] = shape[0]
    return sizes


def overlay_shapes(model: onnx.ModelProto | LoadedModel, base: Mapping[str, Sequence[int]],
                   top: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """`top` (the user's shapes and dimension sizes) over `base` (a plan's shapes): a base
    shape is dropped where it would contradict `top`, by naming the same input or using a
    dimension that `top` sizes."""
    proto = model if isinstance(model, onnx.ModelProto) else model.proto
    sized = set(top)
    if not isinstance(model, onnx.ModelProto):  # a dimension summed from a sized one changes
        sized |= {name for name, parts in model.declared.sums.items() if sized & set(parts)}
    merged = {n: tuple(v) for n, v in top.items()}
    uses = {vi.name: {dim_symbol(d, vi.name, i)
                      for i, d in enumerate(vi.type.tensor_type.shape.dim) if not is_fixed(d)}
            for vi in graph_inputs(proto)}
    for name, shape in base.items():
        if name not in sized and not (uses.get(name, set()) & sized):
            merged[name] = tuple(shape)
    return merged


def unpinned_dims(
    model: onnx.ModelProto | LoadedModel,
    given: Mapping[str, Sequence[int]] | None = None,
    declared: Mapping[str, int] | None = None,
) -> dict[str, list[str]]:
    """Per input, the symbolic dimensions that are not batch-like and that neither the user nor
    the model pinned: the ones a default of 1 is most likely wrong for (image height and width,
    say)."""
    if not isinstance(model, onnx.ModelProto):  # a LoadedModel
        declared = model.declared.dims if declared is None else declared
        model = model.proto
    declared = dict(declared or {})
    given = dict(given or {})
    found: dict[str, list[str]] = {}
    for vi in graph_inputs(model):
        if vi.name in given or not vi.type.HasField("tensor_type"):
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            sym = "" if is_fixed(d) else dim_symbol(d, vi.name, i)
            if sym and sym not in declared and not is_batch_like(sym) \
                    and "past" not in sym.lower() and not _SUM.match(sym):
                found.setdefault(vi.name, []).append(sym)
    return found


def shape_template(model: onnx.ModelProto | LoadedModel, input_name: str) -> str:
    """`1x3xHEIGHTxWIDTH`: an input's shape with fixed sizes, batch 1 and its symbolic
    dimensions in capitals, to show a user what to give."""
    proto = model if isinstance(model, onnx.ModelProto) else model.proto
    for vi in graph_inputs(proto):
        if vi.name != input_name:
            continue
        parts: list[str] = []
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if is_fixed(d):
                parts.append(str(d.dim_value))
                continue
            sym = dim_symbol(d, vi.name, i)
            parts.append("1" if is_batch_like(sym) else
                         re.sub(r"\W+", "_", sym if ":" not in sym else f"d{i}").upper())
        return "x".join(parts)
    return ""
