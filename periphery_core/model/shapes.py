"""Input shapes: parsing `NAME=1x3x224x224` and resolving symbolic dimensions.

Symbolic dimensions are resolved by name across all inputs, so `batch` gets one value everywhere.
User-given shapes win; a dimension the user did not give defaults to 1, except cache lengths
(names containing `past`), which default to 0: an empty KV cache. Defaults are reported as
notes so a user sees what was assumed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from periphery_core.errors import InputShapeError

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
    model: onnx.ModelProto, given: Mapping[str, Sequence[int]] | None = None
) -> tuple[list[InputSpec], list[str]]:
    """Concrete shapes for every model input, and notes on what was defaulted.

    Raises:
        InputShapeError: a given name is not an input, or a shape has the wrong rank or
            contradicts a fixed dimension.
    """
    given = dict(given or {})
    inputs = graph_inputs(model)
    names = [vi.name for vi in inputs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputShapeError(
            f"'{unknown[0]}' is not an input of this model; its inputs are: {', '.join(names)}"
        )
    symbols: dict[str, int] = {}
    for vi in inputs:
        if vi.name not in given:
            continue
        declared = vi.type.tensor_type.shape.dim
        shape = tuple(given[vi.name])
        if vi.type.tensor_type.HasField("shape") and len(declared) != len(shape):
            raise InputShapeError(
                f"input '{vi.name}' has rank {len(declared)} but the given shape "
                f"{'x'.join(map(str, shape)) or '(scalar)'} has rank {len(shape)}"
            )
        for i, (d, v) in enumerate(zip(declared, shape, strict=False)):
            if d.HasField("dim_value") and d.dim_value != v:
                raise InputShapeError(
                    f"input '{vi.name}' dimension {i} is fixed at {d.dim_value}, "
                    f"but the given shape says {v}"
                )
            if d.dim_param and symbols.setdefault(d.dim_param, v) != v:
                raise InputShapeError(
                    f"dimension '{d.dim_param}' is {symbols[d.dim_param]} in one given shape "
                    f"and {v} in the shape of '{vi.name}': give it one value"
                )
    notes: list[str] = []
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
        dims: list[int] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
                continue
            sym = d.dim_param or f"{vi.name}:{len(dims)}"
            if sym not in symbols:
                default = 0 if "past" in sym.lower() else 1
                symbols[sym] = default
                kind = "batch-like" if _BATCH_LIKE.search(sym) else "symbolic"
                notes.append(
                    f"{kind} dimension '{sym}' defaulted to {default}; set it with "
                    f"--input-shape {vi.name}=..."
                )
            dims.append(symbols[sym])
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs, notes
