"""Which nodes add the most quantization noise: SQNR per intermediate tensor.

This is where to look when a quantized model is inaccurate. Key design choice: the models run
with ONNX Runtime's graph optimizations off, so that every intermediate tensor exists under its
own name in both models, and each node is charged only the noise it adds, not the noise it
inherits from upstream.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from periphery_core.progress import CancelToken, check
from periphery_core.quantize.eval_sessions import ModelLike, proto_of, session_config
from periphery_core.quantize.noise import powers, sqnr_db
from periphery_core.quantize.sources import Feeds
from periphery_core.runtime.session import make_session, run_session


@dataclass(frozen=True, slots=True)
class NodeSensitivity:
    """How much quantization noise one intermediate tensor carries, and how much of it is new.

    `sqnr_db` is the tensor's SQNR: the noise of everything upstream included, so it can only
    fall along the graph. `local_sqnr_db` counts only the noise this node adds: its output's
    noise-to-signal ratio less the worst such ratio among its inputs (inf when it adds none).
    Nodes are ranked by `local_sqnr_db`, so the node that does the damage comes first rather
    than the last layers, which merely inherit it.
    """

    tensor: str
    node: str  # the producing node in the float model
    op_type: str
    sqnr_db: float
    local_sqnr_db: float


def _node_outputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node of the main graph that produces it."""
    return {out: node for node in model.graph.node for out in node.output if out}


def _node_label(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    if node.name:
        return node.name
    return f"{node.op_type}_{list(model.graph.node).index(node)}"


def _noise_ratio(signal: float, noise: float) -> float:
    if noise == 0:
        return 0.0
    return math.inf if signal == 0 else noise / signal


def _dequantized_views(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the DequantizeLinear output that its consumers read, in a QDQ model.

    In a QDQ model a float tensor `t` is read through `DequantizeLinear(QuantizeLinear(t))`,
    so that is the value to compare. The quantizer may also fold a Relu into the quantization
    range and give its name to the tensor before it: only after the Q/DQ pair do the two
    models mean the same thing by that name.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    views: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not node.output:
            continue
        after = [c for c in consumers.get(node.output[0], [])
                 if c.op_type == "DequantizeLinear"]
        if after and after[0].output:
            views.setdefault(node.input[0], after[0].output[0])
    return views


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    # A name alone is enough: ONNX Runtime types the extra outputs from the graph itself.
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed


def node_sqnr(fp32: ModelLike, quant: ModelLike, feeds_iter: Iterable[Feeds], limit: int, *,
              threads: int | None = None,
              cancel: CancelToken | None = None) -> list[NodeSensitivity]:
    """The `limit` nodes that add the most quantization noise, worst first.

    Every float tensor that a node produces under the same name in both models becomes an
    extra output; both models run (optimizations off, so no tensor is fused away) on each feed,
    and SQNR = 10·log10(Σ ref² / Σ (ref − quant)²) over all feeds. Each tensor is attributed to
    the node that produces it in the float model, and ranked by the noise that node adds (see
    `NodeSensitivity`); inputs that are not measured (graph inputs, weights) count as clean, so
    weight quantization is charged to the node that reads the weights. Ties: lower SQNR first,
    then the float graph's order.
    """
    fp32_proto, quant_proto = proto_of(fp32), proto_of(quant)
    producers = _node_outputs(fp32_proto)
    quant_tensors = set(_node_outputs(quant_proto))
    shared = [t for t in producers if t in quant_tensors]
    if not shared or limit <= 0:
        return []
    seen_as = _dequantized_views(quant_proto)
    q_names = [seen_as.get(t, t) for t in shared]
    config = session_config(threads, exact=True)
    with tempfile.TemporaryDirectory() as scratch:
        ref_dir, q_dir = Path(scratch, "fp32"), Path(scratch, "quant")
        ref_dir.mkdir()
        q_dir.mkdir()
        ref_sess = make_session(_with_outputs(fp32_proto, shared), config, ref_dir)
        q_sess = make_session(_with_outputs(quant_proto, q_names), config, q_dir)
        sums: dict[str, list[float]] = {}
        for feeds in feeds_iter:
            check(cancel)
            ref = dict(zip(shared, run_session(ref_sess, feeds, shared), strict=True))
            got = dict(zip(shared, run_session(q_sess, feeds, q_names), strict=True))
            for name in shared:
                r, q = np.asarray(ref[name]), np.asarray(got[name])
                if r.dtype.kind != "f" or q.dtype.kind != "f" or r.shape != q.shape:
                    continue
                signal, noise = powers(r, q)
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += signal
                acc[1] += noise
    ratios = {t: _noise_ratio(*sums[t]) for t in sums}
    found: list[NodeSensitivity] = []
    for tensor in shared:
        if tensor not in sums:
            continue
        node = producers[tensor]
        inherited = max((ratios.get(i, 0.0) for i in node.input if i), default=0.0)
        added = ratios[tensor] - inherited if ratios[tensor] != inherited else 0.0
        local = math.inf if added <= 0 else -10.0 * math.log10(added)
        found.append(NodeSensitivity(tensor, _node_label(fp32_proto, node), node.op_type,
                                     sqnr_db(*sums[tensor]), local))
    found.sort(key=lambda n: (n.local_sqnr_db, n.sqnr_db))
    return found[:limit]
