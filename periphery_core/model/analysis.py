"""What each node of a model costs: FLOPs, parameter bytes, activation bytes, types and shapes.

Every top-level tensor gets a dtype and a concrete shape under the resolved input shapes, even
where ONNX shape inference gives up (com.microsoft contrib ops, data-dependent shapes). Types
come from three sources, tried in order and recorded per tensor: ONNX shape inference, ONNX
Runtime's symbolic shape inference, and one recorded run of the model in ONNX Runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from periphery_core.errors import AnalysisError, InputShapeError, PeripheryError
from periphery_core.model.flops import node_flops
from periphery_core.model.loading import LoadedModel, skeleton
from periphery_core.model.shapes import (
    InputSpec,
    elem_dtype,
    is_fixed,
    resolve_input_shapes,
    shape_template,
    unpinned_dims,
)
from periphery_core.progress import CancelToken, ProgressFn, check, report

log = logging.getLogger(__name__)


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
    # Keys of constant-foldable nodes (see `constant_foldable`): they are re-materialised in
    # every stage that reads them instead of sending their outputs across a boundary.
    constant_nodes: frozenset[str] = field(default=frozenset())

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


# --------------------------------------------------------------------------- graph walking


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads that it does not define itself, recursively."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {i.name for i in graph.sparse_initializer if i.values.name}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= outer_scope_names(sub)
        defined.update(o for o in node.output if o)
    used.update(o.name for o in graph.output)
    return used - defined


def node_inputs(node: onnx.NodeProto) -> tuple[str, ...]:
    """A node's explicit inputs and its subgraphs' outer-scope references, in order, unique."""
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names.extend(sorted(outer_scope_names(sub)))
    return tuple(dict.fromkeys(names))


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


def constant_foldable(graph: onnx.GraphProto, keys: Sequence[str]) -> frozenset[str]:
    """Nodes whose every input is a weight or another such node's output.

    Standard-domain, deterministic, without subgraphs, and not producing a model output: their
    outputs are functions of the weights alone (a `Constant`, a weight `Reshape` or `Transpose`,
    a `ConstantOfShape` of a constant shape), so a stage can recompute them locally.
    """
    known = {i.name for i in graph.initializer} | {i.values.name for i in graph.sparse_initializer}
    outputs = {o.name for o in graph.output}
    found: set[str] = set()
    for node, key in zip(graph.node, keys, strict=True):
        if (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NONDETERMINISTIC
            and not any(True for _ in subgraphs(node))
            and all(not n or n in known for n in node.input)
            and not any(o in outputs for o in node.output)
        ):
            found.add(key)
            known.update(o for o in node.output if o)
    return frozenset(found)


def node_keys(graph: onnx.GraphProto) -> list[str]:
    counts = Counter(n.name for n in graph.node)
    keys: list[str] = []
    taken = {n.name for n in graph.node if n.name and counts[n.name] == 1}
    for i, n in enumerate(graph.node):
        if n.name and counts[n.name] == 1:
            keys.append(n.name)
            continue
        key = f"{n.op_type}_{i}"
        while key in taken:
            key += "_"
        taken.add(key)
        keys.append(key)
    return keys


# --------------------------------------------------------------------------- typing


class _Type(NamedTuple):
    """A value's type as far as it is known: a tensor, or a sequence of tensors."""

    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: rank unknown; always None for sequences
    kind: str = "tensor"
    nbytes: int | None = None  # sequences: total bytes when a run recorded them

    @property
    def known(self) -> bool:
        return self.kind == "sequence" or _concrete(self.shape)


TypeMap = dict[str, _Type]


def _type_of(tp: onnx.TypeProto) -> _Type | None:
    kind = "tensor"
    if tp.HasField("sequence_type") and tp.sequence_type.elem_type.HasField("tensor_type"):
        tp, kind = tp.sequence_type.elem_type, "sequence"
    if not tp.HasField("tensor_type") or tp.tensor_type.elem_type == 0:
        return None
    tt = tp.tensor_type
    shape: tuple[int | None, ...] | None = None
    if tt.HasField("shape") and kind == "tensor":
        shape = tuple(d.dim_value if is_fixed(d) else None for d in tt.shape.dim)
    try:
        return _Type(elem_dtype(tt.elem_type), shape, kind)
    except (KeyError, TypeError, ValueError):
        return None


def _collect_types(graph: onnx.GraphProto, into: TypeMap, overwrite: bool = True) -> None:
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = _type_of(vi.type)
        if t is not None and (overwrite or vi.name not in into or not into[vi.name].known):
            into[vi.name] = t
    for node in graph.node:
        for sub in subgraphs(node):
            _collect_types(sub, into, overwrite)


def _concrete(shape: tuple[int | None, ...] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _fix_inputs(model: onnx.ModelProto, specs: Sequence[InputSpec]) -> onnx.ModelProto:
    """A copy with concrete input shapes (a weight-free skeleton unless `model` is one)."""
    fixed = copy.deepcopy(model)
    by_name = {s.name: s for s in specs}
    for vi in fixed.graph.input:
        spec = by_name.get(vi.name)
        if spec is None or spec.kind != "tensor":
            continue
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in spec.shape:
            shape.dim.add().dim_value = d
    return fixed


def _onnx_types(model: onnx.ModelProto) -> TypeMap:
    types: TypeMap = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # inference is best effort; later sources fill the gaps
        log.debug("onnx shape inference failed: %s", exc)
        inferred = model
    _collect_types(inferred.graph, types)
    return types


def _symbolic_types(model: onnx.ModelProto) -> TypeMap:
    types: TypeMap = {}
    try:
        inferred = _symbolic_infer(model)
    except Exception as exc:
        log.debug("symbolic shape inference failed: %s", exc)
        return types
    if inferred is not None:
        _collect_types(inferred.graph, types)
    return types


def _symbolic_infer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's `SymbolicShapeInference.infer_shapes(auto_merge, guess_output_rank)`,
    without its debugging dump.

    Where inference is incomplete, ORT's `infer_shapes` saves the partial model as
    `sym_shape_infer_temp.onnx` (weights in uuid-named files beside it) in the current
    directory, the user's, before it raises; no option turns that off or moves it, and changing
    directory would move every thread of the process. So this takes the same steps itself and
    raises without saving. Should those steps (private to ORT) change, it falls back to
    `infer_shapes`; tests/test_no_stray_files.py then fails.
    """
    from onnxruntime.tools import symbolic_shape_infer as ssi

    cls = ssi.SymbolicShapeInference
    if not all(hasattr(cls, a) for a in ("_preprocess", "_infer_impl", "_update_output_from_vi")):
        return cls.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    opset = ssi.get_opset(model)
    if not opset or opset < 7:
        return None
    inference = cls(2**31 - 1, True, True, 0)
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise AnalysisError("incomplete symbolic shape inference")
    out: onnx.ModelProto = inference.out_mp_
    return out


def _recorded_types(
    model: onnx.ModelProto,
    names: Sequence[str],
    specs: Sequence[InputSpec],
    feeds: Mapping[str, Any] | None,
) -> TypeMap:
    """Run the model once (on `feeds`, else random data) with `names` exposed as outputs."""
    from periphery_core.runtime.feeds import random_feeds
    from periphery_core.runtime.session import SessionConfig, make_session, run_session

    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory(prefix="periphery-probe-") as tmp:
        sess = make_session(probe, SessionConfig(exact=True), scratch_dir=Path(tmp))
        values = run_session(
            sess, dict(feeds) if feeds is not None else random_feeds(specs), list(names)
        )
    return {n: _recorded(n, v) for n, v in zip(names, values, strict=True)}


def _recorded(name: str, value: Any) -> _Type:
    if isinstance(value, list):
        items = [np.asarray(v) for v in value]
        dtype = items[0].dtype if items else np.dtype(np.float32)
        return _Type(dtype, None, "sequence", sum(int(v.nbytes) for v in items))
    if isinstance(value, np.ndarray):
        return _Type(value.dtype, tuple(value.shape))
    raise AnalysisError(f"tensor '{name}' holds a {type(value).__name__}: Periphery handles "
                        "tensors and sequences of tensors")


# --------------------------------------------------------------------------- analysis


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
    fixed = _fix_inputs(skeleton(model), specs)
    types = _onnx_types(fixed)
    for s in specs:
        types[s.name] = (
            _Type(s.dtype, s.shape) if s.kind == "tensor" else _Type(s.dtype, None, s.kind)
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
        sym = _symbolic_types(fixed)
        for name in missing():
            if name in sym and sym[name].known:
                types[name] = sym[name]
                sources[name] = "symbolic"
    check(cancel)
    report(progress, "analyze", 2, steps, "recorded run")
    gaps = missing()
    if gaps:
        try:
            recorded = _recorded_types(_fix_inputs(model, specs), gaps, specs, feeds)
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
        if t is None or t.kind != "tensor" or not _concrete(t.shape):
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
        constant_nodes=analysis.constant_nodes,
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


ValueOf = Callable[[str], "np.ndarray | None"]
