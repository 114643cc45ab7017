"""FLOP estimates per node: exact numbers for the main operator families, totality on unknowns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from periphery_core.model.flops import node_flops

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Case:
    """One node, the shapes and constants it sees, and the FLOPs it must be charged."""

    id: str
    node: onnx.NodeProto
    shapes: Shapes
    expected: int
    values: dict[str, np.ndarray] = field(default_factory=dict)


def _flops(
    node: onnx.NodeProto, shapes: Shapes, values: dict[str, np.ndarray] | None = None
) -> int:
    constants = values or {}
    return node_flops(node, shapes.get, constants.get)


def _graph(nodes: list[onnx.NodeProto], name: str) -> onnx.GraphProto:
    # Bodies only need their nodes for costing; declared I/O is irrelevant to the estimator.
    return helper.make_graph(nodes, name, inputs=[], outputs=[])


MS = "com.microsoft"

CASES = [
    Case(
        "conv-group-bias",
        helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, pads=[1, 1, 1, 1]),
        {"x": (1, 4, 8, 8), "w": (6, 2, 3, 3), "b": (6,), "y": (1, 6, 8, 8)},
        # out 384 elements, each 2 in-channels x 9 taps of multiply-add, + bias
        2 * 384 * 2 * 9 + 384,
    ),
    Case(
        "conv-no-output-shape",
        helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2]),
        {"x": (1, 3, 8, 8), "w": (4, 3, 1, 1)},
        # output estimated as 1 * 4 * 64 / 4 = 64 elements
        2 * 64 * 3,
    ),
    Case(
        "conv-transpose",
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2]),
        {"x": (1, 4, 5, 5), "w": (4, 3, 2, 2), "y": (1, 3, 10, 10)},
        2 * 100 * 3 * 4,
    ),
    Case(
        "qlinearconv",
        helper.make_node(
            "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], group=1
        ),
        {"x": (1, 2, 4, 4), "w": (3, 2, 3, 3), "y": (1, 3, 2, 2)},
        2 * 12 * 2 * 9,
    ),
    Case(
        "matmul-broadcast-batch",
        helper.make_node("MatMul", ["a", "b"], ["y"]),
        {"a": (2, 1, 3, 4), "b": (5, 4, 6), "y": (2, 5, 3, 6)},
        2 * 10 * 3 * 4 * 6,
    ),
    Case(
        "matmul-1d-left",
        helper.make_node("MatMul", ["a", "b"], ["y"]),
        {"a": (4,), "b": (4, 6)},
        2 * 4 * 6,
    ),
    Case(
        "matmul-1d-right",
        helper.make_node("MatMul", ["a", "b"], ["y"]),
        {"a": (3, 4), "b": (4,)},
        2 * 3 * 4,
    ),
    Case(
        "matmul-zero-sized",
        helper.make_node("MatMul", ["a", "b"], ["y"]),
        {"a": (0, 4), "b": (4, 5), "y": (0, 5)},
        0,
    ),
    Case(
        "matmul-only-left-known",
        helper.make_node("MatMul", ["a", "b"], ["y"]),
        {"a": (3, 4), "y": (3, 7)},
        2 * 21 * 4,
    ),
    Case(
        "gemm-transB-bias",
        helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1),
        {"a": (3, 4), "b": (5, 4), "c": (5,), "y": (3, 5)},
        2 * 3 * 4 * 5 + 15,
    ),
    Case(
        "matmul-nbits",
        helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain=MS, K=16, N=8),
        {"a": (1, 3, 16), "y": (1, 3, 8)},
        2 * 3 * 16 * 8,
    ),
    Case(
        "fused-matmul-transA",
        helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, transA=1),
        {"a": (2, 4, 3), "b": (2, 4, 5)},
        2 * 2 * 3 * 4 * 5,
    ),
    Case(
        "einsum-batched-matmul",
        helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik"),
        {"a": (2, 3, 4), "b": (2, 4, 5)},
        2 * 2 * 3 * 4 * 5,
    ),
    Case(
        "lstm-with-bias",
        helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], hidden_size=4),
        {"x": (7, 2, 3), "w": (1, 16, 3), "r": (1, 16, 4), "b": (1, 32)},
        # per step: gates 2*4*4*(3+4)=224, Wx+Rh 16, biases 32, elementwise 9*4=36
        7 * 2 * (224 + 16 + 32 + 36),
    ),
    Case(
        "lstm-bidirectional",
        helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=4, direction="bidirectional"),
        {"x": (7, 2, 3), "w": (2, 16, 3), "r": (2, 16, 4)},
        7 * 2 * 2 * (224 + 16 + 36),
    ),
    Case(
        "gru-batch-first",
        helper.make_node("GRU", ["x", "w", "r"], ["y"], hidden_size=4, layout=1),
        {"x": (1, 5, 3), "w": (1, 12, 3), "r": (1, 12, 4)},
        # per step: 2*3*4*(3+4)=168, Wx+Rh 12, elementwise 8*4=32
        5 * (168 + 12 + 32),
    ),
    Case(
        "maxpool",
        helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
        {"x": (1, 2, 8, 8), "y": (1, 2, 4, 4)},
        32 * 4,
    ),
    Case(
        "global-average-pool",
        helper.make_node("GlobalAveragePool", ["x"], ["y"]),
        {"x": (1, 3, 5, 5), "y": (1, 3, 1, 1)},
        75,
    ),
    Case(
        "layernorm",
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1),
        {"x": (2, 3, 4), "g": (4,), "b": (4,), "y": (2, 3, 4)},
        5 * 24,
    ),
    Case(
        "softmax",
        helper.make_node("Softmax", ["x"], ["y"]),
        {"x": (2, 10), "y": (2, 10)},
        5 * 20,
    ),
    Case(
        "reduce-mean",
        helper.make_node("ReduceMean", ["x"], ["y"]),
        {"x": (2, 3, 4), "y": (1, 1, 1)},
        24,
    ),
    Case(
        "add-broadcast",
        helper.make_node("Add", ["a", "b"], ["y"]),
        {"a": (2, 3, 4), "b": (4,), "y": (2, 3, 4)},
        24,
    ),
    Case(
        "add-broadcast-output-unknown",
        helper.make_node("Add", ["a", "b"], ["y"]),
        {"a": (2, 1, 4), "b": (3, 1)},
        24,
    ),
    Case(
        "sum-three-inputs",
        helper.make_node("Sum", ["a", "b", "c"], ["y"]),
        {"y": (2, 3, 4)},
        2 * 24,
    ),
    Case(
        "add-scalars",
        helper.make_node("Add", ["a", "b"], ["y"]),
        {"a": (), "b": (), "y": ()},
        1,
    ),
    Case(
        "relu",
        helper.make_node("Relu", ["x"], ["y"]),
        {"x": (3, 4), "y": (3, 4)},
        12,
    ),
    Case(
        "resize-nearest",
        helper.make_node("Resize", ["x", "", "scales"], ["y"]),
        {"x": (1, 1, 2, 2), "y": (1, 1, 4, 4)},
        16,
    ),
    Case(
        "reshape-is-free",
        helper.make_node("Reshape", ["x", "s"], ["y"]),
        {"x": (2, 3, 4), "s": (2,), "y": (6, 4)},
        0,
    ),
    Case(
        "transpose-is-free",
        helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0]),
        {"x": (3, 4), "y": (4, 3)},
        0,
    ),
    Case(
        "unknown-op-counts-output",
        helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom"),
        {"x": (3, 4), "y": (3, 4)},
        12,
    ),
    Case(
        "ms-attention",
        helper.make_node("Attention", ["x", "w", "bias"], ["y"], domain=MS, num_heads=2),
        {"x": (2, 4, 8), "w": (8, 24), "bias": (24,), "y": (2, 4, 8)},
        # projection 2*2*4*8*24 + bias 2*4*24; QK^T and AV 2*2*4*4*8 each; 6 per score
        3072 + 192 + 512 + 512 + 6 * 2 * 2 * 4 * 4,
    ),
    Case(
        "ms-attention-past",
        helper.make_node(
            "Attention", ["x", "w", "bias", "", "past"], ["y", "present"], domain=MS, num_heads=2
        ),
        {"x": (2, 4, 8), "w": (8, 24), "bias": (24,), "past": (2, 2, 2, 3, 4)},
        # keys now span 3 past + 4 new positions
        3072 + 192 + 2 * (2 * 2 * 4 * 7 * 8) + 6 * 2 * 2 * 4 * 7,
    ),
    Case(
        "ms-multi-head-attention",
        helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain=MS, num_heads=2),
        {"q": (1, 4, 8), "k": (1, 6, 8), "v": (1, 6, 8)},
        2 * (2 * 1 * 4 * 6 * 8) + 6 * 1 * 2 * 4 * 6,
    ),
    Case(
        "ms-skip-layernorm-with-bias",
        helper.make_node(
            "SkipLayerNormalization", ["x", "skip", "g", "b", "bias"], ["y"], domain=MS
        ),
        {"x": (2, 4, 8), "y": (2, 4, 8)},
        64 * (5 + 1 + 1),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_node_flops(case: Case) -> None:
    assert _flops(case.node, case.shapes, case.values) == case.expected


def _if_node() -> onnx.NodeProto:
    then_branch = _graph([helper.make_node("MatMul", ["ta", "tb"], ["ty"])], "then")
    else_branch = _graph([helper.make_node("Relu", ["ex"], ["ey"])], "else")
    return helper.make_node(
        "If", ["cond"], ["out"], then_branch=then_branch, else_branch=else_branch
    )


def test_if_costs_its_dearer_branch() -> None:
    shapes: Shapes = {"ta": (2, 3), "tb": (3, 4), "ty": (2, 4), "ex": (2, 4), "ey": (2, 4)}
    assert _flops(_if_node(), shapes) == 2 * 2 * 3 * 4


def _loop_node() -> onnx.NodeProto:
    body = _graph([helper.make_node("Add", ["acc", "step"], ["acc_out"])], "body")
    return helper.make_node("Loop", ["trips", "", "acc0"], ["acc_final"], body=body)


def test_loop_multiplies_body_by_constant_trip_count() -> None:
    shapes: Shapes = {"acc": (3,), "step": (3,), "acc_out": (3,)}
    values = {"trips": np.array(5, dtype=np.int64)}
    assert _flops(_loop_node(), shapes, values) == 5 * 3


def test_loop_with_unknown_trip_count_costs_one_iteration() -> None:
    shapes: Shapes = {"acc": (3,), "step": (3,), "acc_out": (3,)}
    assert _flops(_loop_node(), shapes) == 3


def test_scan_multiplies_body_by_scan_length() -> None:
    body = _graph([helper.make_node("Add", ["state", "row"], ["state_out"])], "body")
    node = helper.make_node(
        "Scan", ["init", "rows"], ["final"], body=body, num_scan_inputs=1, scan_input_axes=[1]
    )
    shapes: Shapes = {"rows": (3, 6), "state": (3,), "row": (3,), "state_out": (3,)}
    assert _flops(node, shapes) == 6 * 3


UNKNOWN_SHAPE_NODES = [
    helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2),
    helper.make_node("ConvTranspose", ["x", "w"], ["y"]),
    helper.make_node("MatMul", ["a", "b"], ["y"]),
    helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1),
    helper.make_node("Einsum", ["a", "b"], ["y"], equation="ij,jk->ik"),
    helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=4),
    helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3]),
    helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear"),
    helper.make_node("Attention", ["x", "w"], ["y"], domain=MS, num_heads=4),
    helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["y"], domain=MS, num_heads=4),
    helper.make_node("Attention", ["q", "k", "v"], ["y"]),
    helper.make_node("Loop", ["", "", "v"], ["y"], body=_graph([], "empty")),
    helper.make_node("Scan", ["s", "x"], ["y"], body=_graph([], "empty"), num_scan_inputs=1),
    helper.make_node("Softmax", ["x"], ["y"]),
    helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom"),
]


@pytest.mark.parametrize("node", UNKNOWN_SHAPE_NODES, ids=lambda n: n.op_type)
def test_unknown_shapes_give_a_nonnegative_int(node: onnx.NodeProto) -> None:
    result = node_flops(node, lambda _name: None, lambda _name: None)
    assert isinstance(result, int)
    assert result >= 0


def test_contradictory_shapes_do_not_raise() -> None:
    # Rank-1 weight for a Conv and a rank-1 "sequence" for an LSTM break their schemas.
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    lstm = helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=4)
    shapes = {"x": (5,), "w": (3,), "y": (2, 2)}
    assert _flops(conv, shapes) >= 0
    assert _flops(lstm, shapes) >= 0


def _fix_input_shape(model: onnx.ModelProto, dims: list[int]) -> None:
    for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim, dims, strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = size


def test_stories260k_is_dominated_by_matmul() -> None:
    path = DATA / "models" / "stories260K.onnx"
    if not path.exists():
        pytest.skip(f"shared model corpus not found at {path}")
    model = onnx.load(path)
    _fix_input_shape(model, [1, 16])
    # data_prop lets Shape -> Gather -> Reshape chains resolve to concrete shapes.
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    shapes: Shapes = {name: value.shape for name, value in values.items()}
    for info in (*graph.value_info, *graph.input, *graph.output):
        tensor = info.type.tensor_type
        if tensor.elem_type != TensorProto.UNDEFINED and all(
            d.HasField("dim_value") for d in tensor.shape.dim
        ):
            shapes[info.name] = tuple(d.dim_value for d in tensor.shape.dim)

    per_op: Counter[str] = Counter()
    for node in graph.node:
        per_op[node.op_type] += node_flops(node, shapes.get, values.get)

    total = sum(per_op.values())
    assert total > 0
    assert per_op["MatMul"] > total / 2
