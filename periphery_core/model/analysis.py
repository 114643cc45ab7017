"""What each node of a model costs: FLOPs, parameter bytes, activation bytes, types and shapes.

Every top-level tensor gets a dtype and a concrete shape under the resolved input shapes, even
where ONNX shape inference gives up (com.microsoft contrib ops, data-dependent shapes): see
`tensor_types` for the three sources tried, whose names are recorded per tensor.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from periphery_core.errors import AnalysisError, InputShapeError, PeripheryError
from periphery_core.model.flops import node_flops
from periphery_core.model.graph import constant_foldable, node_inputs, node_keys, subgraphs
from periphery_core.model.loading import LoadedModel, skeleton
from periphery_core.model.shapes import (
    InputSpec,
    elem_dtype,
    resolve_input_shapes,
    shape_template,
    unpinned_dims,
)
from periphery_core.model.tensor_types import (
    ValueType,
    fix_inputs,
    is_concrete,
    onnx_types,
    recorded_types,
    symbolic_types,
)
from periphery_core.progress import CancelToken, ProgressFn, check, report


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor's type under the analysis' input shapes, and where that type came from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: str  # "input", "onnx", "symbolic" or "run"
    kind: str = "tensor"  # or "sequence" (dtype is then its elements', shape is ())


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One top-level node and its costs.

    `inputs` holds every tensor the node reads, including names its subgraphs (If, Loop, Scan
    bodies) take from the enclosing scope; initializers included. `key` is unique in the model:
    the node's name when that is unique and non-empty, else `<op>_<index>`.
    """

    index: int
    key: str
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: int
    param_bytes: int
    output_bytes: int
    has_subgraph: bool
    measured_s: float | None = None


@dataclass(frozen=True)
class ModelAnalysis:
    """The costed graph of a model under concrete input shapes."""

    path: str
    sha256: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    nodes: tuple[NodeInfo, ...]
    tensors: Mapping[str, TensorInfo]
    initializers: Mapping[str, int]  # name -> bytes
    opsets: Mapping[str, int]
    ir_version: int
    notes: tuple[str, ...] = field(default=())
    # Keys of constant-foldable nodes (see `graph.constant_foldable`): they are re-materialised in
    # every stage that reads them instead of sending their outputs across a boundary.
    constant_nodes: frozenset[str] = field(default=frozenset())
    # What this model's FLOP estimates are multiplied by to cost it as it runs: a run of the
    # whole model timed on the master against the estimate for that host (None: not measured,
    # the estimates as they are; `generate.planning.calibrated`).
    cost_scale: float | None = None

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape for s in self.inputs}

    @property
    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def total_param_bytes(self) -> int:
        """Weights' bytes: initializers, and `Constant` nodes (some exporters store every
        weight as one)."""
        return sum(self.initializers.values()) + sum(
            n.param_bytes for n in self.nodes if n.op_type == "Constant")

    @property
    def parameter_count(self) -> int:
        return self._param_count

    _param_count: int = 0

    @property
    def profiled(self) -> bool:
        return bool(self.nodes) and all(n.measured_s is not None for n in self.nodes)

    @property
    def op_histogram(self) -> list[tuple[str, int]]:
        return Counter(n.op_type for n in self.nodes).most_common()

    def node(self, key: str) -> NodeInfo:
        return self._by_key[key]

    @property
    def _by_key(self) -> dict[str, NodeInfo]:
        cache = self.__dict__.get("_key_cache")
        if cache is None:
            cache = {n.key: n for n in self.nodes}
            self.__dict__["_key_cache"] = cache
        return cache

    def type_sources(self) -> Counter[str]:
        return Counter(t.source for t in self.tensors.values())


def analyze(
    loaded: LoadedModel,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    feeds: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ModelAnalysis:
    """Type and cost every node of a model under concrete input shapes.

    Args:
        loaded: the model, from `load_model`.
        input_shapes: shapes per input name; symbolic dimensions not given default (see
            `resolve_input_shapes`).
        feeds: real input values. Where shape inference cannot type a tensor the model is run
            once, on these when given (shapes can depend on input values, e.g. a size input),
            else on seeded random data. Their shapes override `input_shapes`.
        progress: called between steps.
        cancel: checked between steps.

    Raises:
        InputShapeError: a given shape does not fit the model.
        AnalysisError: some tensor could not be typed by any source.
    """
    model = loaded.proto
    graph = model.graph
    if feeds is not None:
        input_shapes = {
            **(input_shapes or {}),
            **{n: tuple(np.shape(v)) for n, v in feeds.items() if isinstance(v, np.ndarray)},
        }
    specs, notes = resolve_input_shapes(loaded, input_shapes)
    if loaded.declared.source:
        notes.append(f"dimensions {', '.join(f'{k}={v}' for k, v in loaded.declared.dims.items())}"
                     f" come from {loaded.declared.source}")
    steps = 4
    report(progress, "analyze", 0, steps, "shape inference")
    fixed = fix_inputs(skeleton(model), specs)
    types = onnx_types(fixed)
    for s in specs:
        types[s.name] = (
            ValueType(s.dtype, s.shape) if s.kind == "tensor" else ValueType(s.dtype, None, s.kind)
        )
    sources = {name: "onnx" for name in types}
    for s in specs:
        sources[s.name] = "input"
    init_names = {i.name for i in graph.initializer}
    wanted = [o for n in graph.node for o in n.output if o]
    wanted += [o.name for o in graph.output if o.name not in init_names]

    def missing() -> list[str]:
        return [n for n in dict.fromkeys(wanted) if n not in types or not types[n].known]

    check(cancel)
    report(progress, "analyze", 1, steps, "symbolic shape inference")
    if missing():
        sym = symbolic_types(fixed)
        for name in missing():
            if name in sym and sym[name].known:
                types[name] = sym[name]
                sources[name] = "symbolic"
    check(cancel)
    report(progress, "analyze", 2, steps, "recorded run")
    gaps = missing()
    if gaps:
        try:
            recorded = recorded_types(fix_inputs(model, specs), gaps, specs, feeds)
        except PeripheryError as exc:
            _raise_if_unpinned(loaded, input_shapes, feeds, exc)
            if feeds is None:
                raise AnalysisError(
                    f"{len(gaps)} tensors (first: '{gaps[0]}') can only be typed by running the "
                    f"model, and it fails on random inputs ({exc.message}): give real ones "
                    "with --inputs FEEDS.npz (one array per input)"
                ) from None
            raise AnalysisError(
                f"{len(gaps)} tensors (first: '{gaps[0]}') could not be typed, and running the "
                f"model on the given inputs to record them failed: {exc.message}"
            ) from None
        for name, value in recorded.items():
            types[name] = value
            sources[name] = "run"
        notes.append(f"{len(gaps)} tensor types came from a recorded run of the model")
    check(cancel)
    report(progress, "analyze", 3, steps, "costs")

    # Initializers: dense and sparse, including those only subgraphs read.
    init_bytes: dict[str, int] = {}
    constants: dict[str, onnx.TensorProto] = {}

    def collect_inits(g: onnx.GraphProto) -> None:
        for init in g.initializer:
            init_bytes[init.name] = _tensor_nbytes(init)
            constants[init.name] = init
        for n in g.node:
            for sub in subgraphs(n):
                collect_inits(sub)

    collect_inits(graph)
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for attr in n.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    constants[n.output[0]] = attr.t

    value_cache: dict[str, np.ndarray | None] = {}

    def value_of(name: str) -> np.ndarray | None:
        if name not in value_cache:
            proto = constants.get(name)
            value_cache[name] = None
            if proto is not None and _tensor_nbytes(proto) <= 1 << 16:
                try:
                    value_cache[name] = numpy_helper.to_array(proto)
                except Exception:  # unusual storage: a missing constant only loses precision
                    value_cache[name] = None
        return value_cache[name]

    def shape_of(name: str) -> tuple[int, ...] | None:
        t = types.get(name)
        if t is None or t.kind != "tensor" or not is_concrete(t.shape):
            init = constants.get(name)
            return tuple(init.dims) if init is not None else None
        return tuple(int(d or 0) for d in t.shape or ())

    tensors: dict[str, TensorInfo] = {}
    for name in dict.fromkeys([s.name for s in specs] + wanted):
        if name not in types:
            raise AnalysisError(f"tensor '{name}' could not be typed")
        t = types[name]
        concrete = tuple(int(d or 0) for d in (t.shape or ()))
        nbytes = t.nbytes if t.nbytes is not None else (
            int(np.prod(concrete, dtype=np.int64)) * _itemsize(t.dtype)
        )
        tensors[name] = TensorInfo(
            name, str(t.dtype), concrete, nbytes, sources.get(name, "onnx"), t.kind
        )

    keys = node_keys(graph)
    nodes: list[NodeInfo] = []
    for i, (n, key) in enumerate(zip(graph.node, keys, strict=True)):
        if i % 256 == 0:
            check(cancel)
        ins = node_inputs(n)
        outs = tuple(o for o in n.output if o)
        params = sum(init_bytes.get(x, 0) for x in dict.fromkeys(ins) if x in init_bytes)
        if n.op_type == "Constant":
            params += sum(tensors[o].nbytes for o in outs if o in tensors)
        nodes.append(
            NodeInfo(
                index=i,
                key=key,
                name=n.name,
                op_type=n.op_type,
                domain=n.domain or "",
                inputs=ins,
                outputs=outs,
                flops=max(0, int(node_flops(n, shape_of, value_of))),
                param_bytes=int(params),
                output_bytes=sum(tensors[o].nbytes for o in outs if o in tensors),
                has_subgraph=any(True for _ in subgraphs(n)),
            )
        )
    report(progress, "analyze", steps, steps, "done")
    result = ModelAnalysis(
        path=str(loaded.path),
        sha256=loaded.sha256,
        inputs=tuple(specs),
        outputs=tuple(o.name for o in graph.output),
        nodes=tuple(nodes),
        tensors=tensors,
        initializers=init_bytes,
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        ir_version=model.ir_version,
        notes=tuple(notes),
        constant_nodes=constant_foldable(graph, keys),
    )
    object.__setattr__(
        result, "_param_count",
        sum(int(np.prod(t.dims, dtype=np.int64)) for t in constants.values()),
    )
    return result


def _raise_if_unpinned(loaded: LoadedModel, input_shapes: Mapping[str, Sequence[int]] | None,
                       feeds: Mapping[str, Any] | None, exc: PeripheryError) -> None:
    """A model that fails at its defaulted sizes: name the input and dims to give, one line."""
    if feeds is not None:
        return
    unpinned = unpinned_dims(loaded, input_shapes)
    if not unpinned:
        return
    name, dims = next(iter(unpinned.items()))
    cause = exc.message.split(": ", 1)[-1][:160]
    labels = [d if not d.startswith(f"{name}:") else f"#{d.rsplit(':', 1)[1]} (unnamed)"
              for d in dims]
    raise InputShapeError(
        f"input '{name}' has symbolic dimensions {', '.join(labels)} that the model does not "
        f"pin; at the default of 1 it does not run ({cause}). Give its shape: "
        f"--input-shape {name}={shape_template(loaded, name)}"
    ) from None


def with_measurements(analysis: ModelAnalysis, measured: Mapping[str, float]) -> ModelAnalysis:
    """A copy of `analysis` whose nodes carry measured seconds (keys missing get 0)."""
    nodes = tuple(
        dataclasses.replace(n, measured_s=float(measured.get(n.key, 0.0))) for n in analysis.nodes
    )
    result = ModelAnalysis(
        path=analysis.path, sha256=analysis.sha256, inputs=analysis.inputs,
        outputs=analysis.outputs, nodes=nodes, tensors=analysis.tensors,
        initializers=analysis.initializers, opsets=analysis.opsets,
        ir_version=analysis.ir_version, notes=analysis.notes,
        constant_nodes=analysis.constant_nodes, cost_scale=analysis.cost_scale,
    )
    object.__setattr__(result, "_param_count", analysis.parameter_count)
    return result


def _itemsize(dtype: np.dtype) -> int:
    return 8 if dtype == np.dtype(object) else int(dtype.itemsize)


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    try:
        itemsize = _itemsize(elem_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize

