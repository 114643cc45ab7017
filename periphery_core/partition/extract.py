"""Shard extraction: one standalone ONNX model per plan stage.

Each shard holds only its own nodes and the initializers they (and their subgraphs) read; its
inputs and outputs are the plan's boundary tensors, typed from ONNX shape inference on the
original model (symbolic dimensions kept, so shards accept any batch the model accepts) and,
where that inference gives up, from the analysis (dtype and rank). Tensors that only pass
through a stage are both its input and its output. Opset imports, IR version and the
model-local functions the shard uses are carried over; a shard passes `onnx.checker`'s full
check whenever the original model does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from periphery_core.errors import ExtractError, PlanError
from periphery_core.model.analysis import ModelAnalysis
from periphery_core.model.graph import node_inputs, node_keys, subgraphs
from periphery_core.model.loading import (
    DataFiles,
    LoadedModel,
    approx_nbytes,
    save_model,
    skeleton,
)
from periphery_core.partition.plan import ShardPlan
from periphery_core.progress import CancelToken, ProgressFn, check, report

STAGE_FILE = "stage-{index}.onnx"
PLAN_FILE = "plan.json"
ON_DISK_MIN = 1 << 20  # (iter_shards' weights_on_disk) what a deploy sends from a data file
HELD = "periphery:held"  # (weights_on_disk) a big weight's bytes are the loaded model's
_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
           if hasattr(onnx.TensorProto, n)}  # sub-byte types: packed in raw_data alone


def raw_nbytes(t: onnx.TensorProto) -> int:
    """The bytes of `t`'s data as raw_data holds it, from its shape and type alone."""
    return (math.prod(t.dims) + 1) // 2 if t.data_type in _PACKED else approx_nbytes(t)


def raw_bytes_known(t: onnx.TensorProto) -> bool:
    """Whether `t`'s bytes as raw_data holds them can be had (not for strings, nor for a
    sub-byte type held in a typed field)."""
    return t.data_type != onnx.TensorProto.STRING and (
        t.data_type not in _PACKED or t.HasField("raw_data"))


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of top-level tensors from ONNX inference on the unmodified (symbolic) model."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            skeleton(model), strict_mode=False, data_prop=True
        )
    except Exception:  # best effort: the analysis' types fill any gap
        inferred = model
    types: dict[str, onnx.TypeProto] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        is_tensor = vi.type.HasField("tensor_type") and tt.elem_type != 0 and tt.HasField("shape")
        seq = vi.type.sequence_type
        is_sequence = vi.type.HasField("sequence_type") and seq.elem_type.HasField("tensor_type")
        if is_tensor or is_sequence:
            types[vi.name] = vi.type
    return types


def _value_info(
    name: str, types: dict[str, onnx.TypeProto], analysis: ModelAnalysis
) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto(name=name)
    inferred = types.get(name)
    info = analysis.tensors.get(name)
    if inferred is not None and (
        info is None
        or (info.kind == "sequence" and inferred.HasField("sequence_type"))
        or (info.kind == "tensor" and inferred.HasField("tensor_type")
            and len(inferred.tensor_type.shape.dim) == len(info.shape))
    ):
        vi.type.CopyFrom(inferred)
        return vi
    if info is None:
        raise ExtractError(f"boundary tensor '{name}' has no known type")
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    if info.kind == "sequence":
        vi.type.sequence_type.elem_type.tensor_type.elem_type = elem
        return vi
    tt = vi.type.tensor_type
    tt.elem_type = elem
    tt.shape.SetInParent()  # a scalar has an empty shape, not none
    for _ in info.shape:
        tt.shape.dim.add()  # rank known, sizes left open: the shard stays shape-generic
    return vi


def _functions_used(
    nodes: Iterable[onnx.NodeProto], functions: dict[tuple[str, str], onnx.FunctionProto]
) -> list[onnx.FunctionProto]:
    seen: dict[tuple[str, str], onnx.FunctionProto] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        for sub in subgraphs(node):
            stack.extend(sub.node)
        key = (node.domain, node.op_type)
        if key in functions and key not in seen:
            seen[key] = functions[key]
            stack.extend(functions[key].node)
    return list(seen.values())


def _with_constants(
    nodes: list[onnx.NodeProto], const_producer: dict[str, int], graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """`nodes` preceded by the constant-foldable nodes they need, in the model's order."""
    needed: set[int] = set()
    stack = [x for node in nodes for x in node_inputs(node) if x in const_producer]
    while stack:
        i = const_producer[stack.pop()]
        if i not in needed:
            needed.add(i)
            stack.extend(x for x in graph.node[i].input if x in const_producer)
    return [graph.node[i] for i in sorted(needed)] + nodes


def check_plan_fits(plan: ShardPlan, loaded: LoadedModel) -> list[int]:
    """Node indices of each stage, in stage order; raises if the plan is not for this model."""
    keys = node_keys(loaded.proto.graph)
    index = {k: i for i, k in enumerate(keys)}
    unknown = [k for s in plan.stages for k in s.nodes if k not in index]
    if unknown:
        raise PlanError(
            f"the plan names node '{unknown[0]}', which {loaded.name} does not have: "
            "was the plan made for another model?"
        )
    order = [index[k] for s in plan.stages for k in s.nodes]
    if len(order) != len(keys) or len(set(order)) != len(keys):
        raise PlanError(
            f"the plan covers {len(set(order))} of {len(keys)} nodes of {loaded.name} "
            "(or lists one twice): re-run 'periphery plan'"
        )
    return order


def extract_shards(
    loaded: LoadedModel,
    analysis: ModelAnalysis,
    plan: ShardPlan,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> list[onnx.ModelProto]:
    """Build one standalone ONNX model per stage of `plan` (see `iter_shards`)."""
    return list(iter_shards(loaded, analysis, plan, progress=progress, cancel=cancel))


def iter_shards(
    loaded: LoadedModel,
    analysis: ModelAnalysis,
    plan: ShardPlan,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    weights_on_disk: bool = False,
) -> Iterator[onnx.ModelProto]:
    """Build one standalone ONNX model per stage of `plan`, one at a time: a caller that
    writes each and lets it go holds the model and one shard, not every shard at once.

    `weights_on_disk`: a weight of `ON_DISK_MIN` bytes or more that the model read from a data
    file, still the one it read, stays declared as the file declares it (data_location
    EXTERNAL, relative to the model's folder) rather than copied into the shard; one the model
    holds in memory is declared EXTERNAL at location `HELD`: for a caller that sends its bytes
    from the file or from the loaded model (`cluster.shard_parts`).

    Raises:
        PlanError: the plan does not fit this model.
        ExtractError: a shard fails a check the original model passes.
    """
    model = loaded.proto
    graph = model.graph
    check_plan_fits(plan, loaded)
    keys = node_keys(graph)
    by_key = {k: graph.node[i] for i, k in enumerate(keys)}
    inits = {i.name: i for i in graph.initializer}
    sparse = {i.values.name: i for i in graph.sparse_initializer}
    value_infos = {vi.name: vi for vi in graph.value_info}
    functions = {(f.domain, f.name): f for f in model.functions}
    # Constant-foldable nodes are re-materialised in every stage that reads them, wherever the
    # plan lists them (see graph.constant_foldable and planning_graph).
    const_producer = {
        o: i for i, k in enumerate(keys) if k in analysis.constant_nodes
        for o in graph.node[i].output if o
    }
    types = _inferred_types(model)
    model_outputs = {o.name: o for o in graph.output}
    listed_inputs = {i.name: i for i in graph.input if i.name in inits}
    for stage in plan.stages:
        check(cancel)
        report(progress, "extract", stage.index, plan.k, f"stage {stage.index}")
        nodes = _with_constants(
            [by_key[k] for k in stage.nodes if k not in analysis.constant_nodes],
            const_producer, graph,
        )
        reads: dict[str, None] = {}
        produced: set[str] = set()
        for node in nodes:
            for name in node_inputs(node):
                if name not in produced:
                    reads[name] = None
            produced.update(o for o in node.output if o)
        boundary_in = [b.name for b in stage.inputs]
        available = set(boundary_in) | produced
        missing = [n for n in reads if n not in available and n not in inits and n not in sparse]
        if missing:
            raise PlanError(
                f"stage {stage.index} reads '{missing[0]}', which neither an earlier stage nor "
                "the model's weights provide: the plan's order is not topological"
            )
        shard = onnx.ModelProto()
        sub = shard.graph  # built in place: a copy would hold the stage's weights twice
        sub.name = f"{graph.name or 'model'}_stage{stage.index}"
        sub.node.extend(nodes)
        sub.input.extend(_value_info(n, types, analysis) for n in boundary_in)
        for b in stage.outputs:
            if b.name not in available:
                raise PlanError(
                    f"stage {stage.index} must output '{b.name}' but cannot reach it"
                )
            # A model output keeps the model's own declaration: it may be no tensor at all
            # (ZipMap's sequence of maps), which neither inference nor the analysis types.
            sub.output.append(model_outputs[b.name] if b.name in model_outputs
                              else _value_info(b.name, types, analysis))
        own_inits = [n for n in reads if n in inits and n not in set(boundary_in)]
        sub.initializer.extend((weights_on_disk and _by_reference(inits[n], loaded.data_files))
                               or inits[n] for n in own_inits)
        sub.sparse_initializer.extend(sparse[n] for n in reads if n in sparse)
        # IR 3 requires every initializer to be listed among the graph inputs too, and an
        # initializer the model lists as an input (IR 4+ allows it) is one ONNX Runtime treats
        # as overridable, not constant, and computes with other kernels: keep it so, or the
        # stage's results differ from the whole model's in the last bits.
        for n in own_inits:
            if model.ir_version < 4 or n in listed_inputs:
                sub.input.append(listed_inputs.get(n) or onnx.helper.make_tensor_value_info(
                    n, inits[n].data_type, list(inits[n].dims)))
        io_names = set(boundary_in) | {b.name for b in stage.outputs}
        sub.value_info.extend(
            value_infos[n] for n in produced if n in value_infos and n not in io_names
        )
        shard.ir_version = model.ir_version
        shard.opset_import.extend(model.opset_import)
        shard.producer_name = "periphery"
        shard.producer_version = model.producer_version
        shard.domain = model.domain
        shard.model_version = model.model_version
        shard.functions.extend(_functions_used(nodes, functions))
        meta = {
            "periphery.stage": str(stage.index),
            "periphery.stages": str(plan.k),
            "periphery.model_sha256": plan.model_sha256,
        }
        for k, v in meta.items():
            shard.metadata_props.add(key=k, value=v)
        if loaded.checker_ok:
            try:
                onnx.checker.check_model(skeleton(shard), full_check=True)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise ExtractError(
                    f"stage {stage.index} fails onnx.checker although the model passes: {first}"
                ) from None
        yield shard
    report(progress, "extract", plan.k, plan.k, "done")


def _by_reference(init: onnx.TensorProto, files: DataFiles | None) -> onnx.TensorProto | None:
    """`init`'s declaration in its data file, for a big weight still there, else (a weight the
    model holds in memory) one that names it `HELD` (see iter_shards); None: copy it."""
    if approx_nbytes(init) < ON_DISK_MIN:
        return None
    if files is not None and (head := files.header(init.name)) is not None:
        return head
    if init.data_location == onnx.TensorProto.EXTERNAL or not raw_bytes_known(init):
        return None  # (copied: a weight not loaded is the shard's to declare)
    held = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims,
                            data_location=onnx.TensorProto.EXTERNAL)
    held.external_data.add(key="location", value=HELD)
    return held


def write_shards(shards: Iterable[onnx.ModelProto], plan: ShardPlan, out_dir: Path, *,
                 keep: bool = True, weights_dir: Path | None = None) -> list[Path]:
    """Write `stage-<i>.onnx` files and the plan into `out_dir`.

    `keep=False` (with `iter_shards`): the caller is done with each shard once written, so
    each is made, written (a big one with its weights streamed to `stage-<i>.onnx.data`) and
    let go before the next: the model and one shard are all that is ever in memory.

    `weights_dir`: the shards come from a model loaded with `weights="small"` whose external
    data lies there. With `keep=False` a big shard's weights are then copied from those files
    into its own, so only the graph is ever in memory (see `loading.save_model`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("stage-*.onnx"), *out_dir.glob("stage-*.onnx.data")]:
        stale.unlink()  # a folder re-used for fewer stages must not keep the old ones
    paths = []
    for i, shard in enumerate(shards):
        path = out_dir / STAGE_FILE.format(index=i)
        save_model(shard, path, keep=keep, weights_dir=weights_dir)
        paths.append(path)
        del shard  # before the next is made
    plan.save(out_dir / PLAN_FILE)
    return paths


def shard_paths(shard_dir: Path) -> list[Path]:
    """The stage files of a shard folder, in stage order."""
    if not shard_dir.is_dir():
        raise PlanError(f"shard folder not found: {shard_dir} (make one with 'periphery shard')")
    paths: list[Path] = []
    while (shard_dir / STAGE_FILE.format(index=len(paths))).is_file():
        paths.append(shard_dir / STAGE_FILE.format(index=len(paths)))
    if not paths:
        raise PlanError(f"{shard_dir} holds no stage-0.onnx: make shards with 'periphery shard'")
    if (shard_dir / PLAN_FILE).is_file():
        from periphery_core.partition.plan import load_plan

        k = load_plan(shard_dir / PLAN_FILE).k
        if k != len(paths):
            raise PlanError(f"{shard_dir} holds {len(paths)} stage files but its plan.json has "
                            f"{k} stages: re-run 'periphery shard'")
    return paths
