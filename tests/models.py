"""Tiny ONNX models built in code, for tests that need a graph of a particular shape.

Every model is IR 8 / opset 17 (ONNX Runtime refuses onnx's newer default IR) and has seeded
random weights, so outputs depend on every weight and a wrong shard shows up as a difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17
FLOAT = TensorProto.FLOAT


def _model(
    graph: onnx.GraphProto,
    functions: list[onnx.FunctionProto] | None = None,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=opsets, functions=functions or [],
        producer_name="periphery-tests",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _weight(name: str, shape: tuple[int, ...], seed: int) -> TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def mlp(width: int = 32, layers: int = 3, batch: int | str = 1) -> onnx.ModelProto:
    """x[batch, width] -> (MatMul w_i, Relu) * layers -> y[batch, width]: 2*layers nodes.

    The weights are width*width float32 each (4 KiB at width 32), large enough to be moved to
    external data by `size_threshold=1024`.
    """
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        inits.append(_weight(f"w{i}", (width, width), seed=i))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Relu", [f"mm{i}"], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", FLOAT, [batch, width])],
        inits,
    )
    return _model(graph)


def symbolic_inputs() -> onnx.ModelProto:
    """Inputs with shared and cache-length symbols, for shape resolution (never run).

    tokens: int64 [batch, seq]; past: float [batch, 4, past_len, 8]; mask: int64
    [batch, total]; free: float [?, 3] (a dimension with neither value nor name).
    """
    inputs = [
        helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("past", FLOAT, ["batch", 4, "past_len", 8]),
        helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("free", FLOAT, [None, 3]),
    ]
    outputs = []
    for vi in inputs:
        out = onnx.ValueInfoProto()
        out.CopyFrom(vi)
        out.name = vi.name + "_out"
        outputs.append(out)
    nodes = [helper.make_node("Identity", [vi.name], [vi.name + "_out"]) for vi in inputs]
    graph = helper.make_graph(nodes, "symbolic", inputs, outputs)
    return _model(graph)


def save_with_external_data(model: onnx.ModelProto, path: Path, location: str = "w.data") -> Path:
    """Save `model` with every initializer in one external file `location` beside `path`."""
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=location, size_threshold=0,
    )
    return path


def with_local_function() -> onnx.ModelProto:
    """x -> Relu -> custom.ScaleShift(., x) -> Tanh -> Neg -> y.

    `custom.ScaleShift(A, B) = (A + B) * B` is a model-local function (domain "custom").
    """
    fn = helper.make_function(
        "custom", "ScaleShift", ["A", "B"], ["C"],
        [
            helper.make_node("Add", ["A", "B"], ["S"]),
            helper.make_node("Mul", ["S", "B"], ["C"]),
        ],
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ScaleShift", ["r", "x"], ["f"], name="scale_shift", domain="custom"),
        helper.make_node("Tanh", ["f"], ["t"], name="tanh"),
        helper.make_node("Neg", ["t"], ["y"], name="neg"),
    ]
    graph = helper.make_graph(
        nodes, "local_function",
        [helper.make_tensor_value_info("x", FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 8])],
    )
    return _model(graph, functions=[fn], extra_opsets={"custom": 1})


def early_output_late_input(width: int = 16) -> onnx.ModelProto:
    """A chain whose first node makes a model output and whose last node reads a model input.

    x -> MatMul(w0) = `early` (a model output) -> Relu -> MatMul(w1) -> Relu -> MatMul(w2)
      -> Add(., z) = `y`;  `z` is read by the last node only.
    """
    inits = [_weight(f"w{i}", (width, width), seed=10 + i) for i in range(3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["early"], name="first"),
        helper.make_node("Relu", ["early"], ["r0"], name="relu0"),
        helper.make_node("MatMul", ["r0", "w1"], ["m1"], name="matmul1"),
        helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="matmul2"),
        helper.make_node("Add", ["m2", "z"], ["y"], name="last"),
    ]
    graph = helper.make_graph(
        nodes, "early_late",
        [helper.make_tensor_value_info("x", FLOAT, [1, width]),
         helper.make_tensor_value_info("z", FLOAT, [1, width])],
        [helper.make_tensor_value_info("early", FLOAT, [1, width]),
         helper.make_tensor_value_info("y", FLOAT, [1, width])],
        inits,
    )
    return _model(graph)
