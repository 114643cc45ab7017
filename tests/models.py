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


# --------------------------------------------------------------------------- export styles
# Small models with the traits of other exporters' files (issue: real-world models).


def symbolic_spatial(channels: int = 4) -> onnx.ModelProto:
    """A detector-like input `[batch, 3, height, width]` whose graph fails at 1x1: a pooled
    branch is upsampled and concatenated with the full-size one (the pool of a 1x1 map is
    empty)."""
    x = helper.make_tensor_value_info("images", FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("y", FLOAT, ["batch", 2, "height", "width"])
    nodes = [
        helper.make_node("Conv", ["images", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c1", "", "scales"], ["u1"], mode="nearest"),
        helper.make_node("Concat", ["r0", "u1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["y"]),
    ]
    inits = [
        _weight("w0", (channels, 3, 3, 3), 1),
        _weight("w1", (channels, channels, 3, 3), 2),
        _weight("w2", (2, 2 * channels, 1, 1), 3),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    return _model(helper.make_graph(nodes, "symbolic_spatial", [x], [y], inits))


def paddle_style() -> onnx.ModelProto:
    """What paddle2onnx writes: `dim_value: -1` for dynamic dims, a `?` name elsewhere, and
    weights as `Constant` nodes (one reached only through a Transpose) instead of
    initializers."""
    x = helper.make_tensor_value_info("x", FLOAT, [1, 3, 8, 16])
    for i in (0, 2, 3):
        dim = x.type.tensor_type.shape.dim[i]
        dim.Clear()
        dim.dim_value = -1
    y = helper.make_tensor_value_info("y", FLOAT, ["?", 6])
    rng = np.random.default_rng(7)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name],
                                value=numpy_helper.from_array(value, name + "_value"))

    nodes = [
        const("conv_w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
        const("conv_b", rng.standard_normal(8).astype(np.float32)),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        const("fc_wt", rng.standard_normal((6, 8)).astype(np.float32)),
        helper.make_node("Transpose", ["fc_wt"], ["fc_w"], perm=[1, 0]),
        helper.make_node("MatMul", ["f", "fc_w"], ["y"]),
    ]
    return _model(helper.make_graph(nodes, "paddle_style", [x], [y]))


def if_on_sample_rate(frame: int = 1600) -> onnx.ModelProto:
    """A VAD-like model that branches on a scalar `sr` input: at 16 kHz it cuts the signal into
    10 ms windows of 160 samples; otherwise into `sr / 100`-sample windows, which fails for the
    small random integers a typing run would feed."""
    x = helper.make_tensor_value_info("x", FLOAT, [frame])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", FLOAT, [])

    def branch(name: str, nodes: list[onnx.NodeProto], inits: list[TensorProto]) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(name + "_out", FLOAT, ["frames", "window"])
        return helper.make_graph(nodes, name, [], [out], inits)

    then = branch("at16k", [helper.make_node("Reshape", ["x", "shape16"], ["at16k_out"])],
                  [numpy_helper.from_array(np.array([-1, 160], np.int64), "shape16")])
    other = branch("other", [
        helper.make_node("Div", ["sr", "hundred"], ["win"]),
        helper.make_node("Unsqueeze", ["win", "zero"], ["win1"]),
        helper.make_node("Concat", ["minus1", "win1"], ["shape_o"], axis=0),
        helper.make_node("Reshape", ["x", "shape_o"], ["other_out"]),
    ], [numpy_helper.from_array(np.array(100, np.int64), "hundred"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    nodes = [
        helper.make_node("Equal", ["sr", "k16"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["frames"], then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["frames", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("ReduceMean", ["t"], ["y"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(np.array(16000, np.int64), "k16"), _weight("w", (160, 8), 4)]
    return _model(helper.make_graph(nodes, "if_on_sample_rate", [x, sr], [y], inits))


def initializers_as_inputs() -> onnx.ModelProto:
    """An MLP whose weights are also listed as graph inputs, as older exporters wrote (IR 4+
    allows it; ONNX Runtime then treats them as overridable)."""
    model = mlp(width=16, layers=3)
    for init in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


def classifier_with_zipmap() -> onnx.ModelProto:
    """A scikit-learn-style classifier: ai.onnx.ml LinearClassifier, then ZipMap, whose output
    is a sequence of maps, not a tensor."""
    x = helper.make_tensor_value_info("x", FLOAT, [1, 4])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [1])
    probs = helper.make_value_info(
        "probabilities", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
                FLOAT, []))))
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("LinearClassifier", ["xs"], ["label", "scores"], domain="ai.onnx.ml",
                         coefficients=rng.standard_normal(12).tolist(), intercepts=[0.1, 0.2, 0.3],
                         classlabels_ints=[0, 1, 2], post_transform="SOFTMAX"),
        helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml",
                         classlabels_int64s=[0, 1, 2]),
    ]
    scale = numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "scale")
    graph = helper.make_graph(nodes, "classifier", [x], [label, probs], [scale])
    return _model(graph, extra_opsets={"ai.onnx.ml": 3})


def misleading_costs(n: int = 65536, sorts: int = 4, matmuls: int = 6) -> onnx.ModelProto:
    """A model whose FLOP estimates are far off: full sorts (TopK with k = n, counted as one
    FLOP per element but n log n comparisons in fact) of a [1, n] vector, then MatMuls of a
    [256, 256] matrix (counted exactly, and faster per FLOP than the planner's reference).
    Planned on estimates, the sorts land in one stage with half the MatMuls; measured, that
    stage takes many times as long as the other."""
    nodes, inits, x = [], [numpy_helper.from_array(np.array([n], dtype=np.int64), "k")], "x"
    for i in range(sorts):
        nodes.append(helper.make_node("TopK", [x, "k"], [f"v{i}", f"i{i}"], name=f"sort{i}"))
        nodes.append(helper.make_node("Neg", [f"v{i}"], [f"n{i}"], name=f"neg{i}"))
        x = f"n{i}"
    side = int(np.sqrt(n))
    inits.append(numpy_helper.from_array(np.array([side, side], dtype=np.int64), "square"))
    nodes.append(helper.make_node("Reshape", [x, "square"], ["m0"], name="reshape"))
    for j in range(matmuls):
        inits.append(_weight(f"w{j}", (side, side), seed=j))
        nodes.append(helper.make_node("MatMul", [f"m{j}", f"w{j}"], [f"m{j + 1}"], name=f"mm{j}"))
    graph = helper.make_graph(
        nodes, "misleading", [helper.make_tensor_value_info("x", FLOAT, [1, n])],
        [helper.make_tensor_value_info(f"m{matmuls}", FLOAT, [side, side])], inits)
    return _model(graph)
