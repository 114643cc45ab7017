"""Before quantizing: what is already quantized, and weights where the quantizers look for them.

Quantizers (ONNX Runtime's and Neural Compressor's) quantize a MatMul, Gemm or Conv whose weight
is an initializer. Some exporters (paddle2onnx, some tf2onnx versions) store every weight as a
`Constant` node, sometimes behind a Transpose or a Reshape of a constant; ONNX Runtime then
fails with `Expected ... to be an initializer`. `lift_weights` folds those constant subgraphs
(onnxscript's constant folder) and lifts the constants to initializers (onnx-ir's pass), so the
quantizers see ordinary weights. It runs only when some weight needs it, so other models keep
their nodes (and node names, which exclusions address) untouched.

`survey` says what a model already holds: integer ops from an earlier quantization, and the
float weights that are still there to quantize. `quantize` refuses a model with nothing float
left and says which quantized ops it found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx

# Ops that only a quantized model holds (standard and com.microsoft).
QUANTIZED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QAttention",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeLSTM",
    "GatherBlockQuantized", "QLinearAdd", "QLinearMul", "QLinearConcat",
})
# Ops whose second input is a weight the quantizers turn into integers.
WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
_FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                     onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})
_INTS = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                   onnx.TensorProto.UINT4, onnx.TensorProto.INT16, onnx.TensorProto.UINT16})


@dataclass(frozen=True)
class WeightSurvey:
    """What a model's weights are: already quantized ops, float weights left, and weights held
    in Constant nodes (or computed from them) rather than initializers."""

    quantized: Counter[str] = field(default_factory=Counter)
    float_weights: tuple[str, ...] = ()  # nodes of WEIGHT_OPS with a float initializer weight
    constant_weights: tuple[str, ...] = ()  # such nodes whose weight is not an initializer
    branch_weights: int = 0  # WEIGHT_OPS inside subgraphs (If/Loop/Scan bodies)

    @property
    def quantized_summary(self) -> str:
        return ", ".join(f"{n} {op}" for op, n in self.quantized.most_common())


def survey(model: onnx.ModelProto) -> WeightSurvey:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    constant_valued = set(inits)  # names computable from weights alone
    producers: dict[str, onnx.NodeProto] = {}
    quantized: Counter[str] = Counter()
    float_weights: list[str] = []
    constant_weights: list[str] = []
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        if node.op_type in QUANTIZED_OPS:
            quantized[node.op_type] += 1
        elif node.op_type == "DequantizeLinear" and node.input and node.input[0] in inits \
                and inits[node.input[0]].data_type in _INTS:
            quantized["DequantizeLinear (integer weight)"] += 1
        if node.op_type == "Constant" or (
            node.input and all(not n or n in constant_valued for n in node.input)
            and node.op_type not in ("DequantizeLinear", "QuantizeLinear")
            and node.domain in ("", "ai.onnx")
        ):
            constant_valued.update(o for o in node.output if o)
        if node.op_type in WEIGHT_OPS and len(node.input) > 1:
            weight = node.input[1]
            label = node.name or f"{node.op_type}:{weight}"
            if weight in inits:
                if inits[weight].data_type in _FLOATS:
                    float_weights.append(label)
            elif weight in constant_valued and _is_float_constant(producers.get(weight)):
                constant_weights.append(label)
    branch = sum(_weight_ops_in(sub) for node in graph.node for sub in _subgraphs(node))
    return WeightSurvey(quantized, tuple(float_weights), tuple(constant_weights), branch)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + [
        g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def _weight_ops_in(graph: onnx.GraphProto) -> int:
    return sum(node.op_type in WEIGHT_OPS for node in graph.node) + sum(
        _weight_ops_in(sub) for node in graph.node for sub in _subgraphs(node))


def _is_float_constant(node: onnx.NodeProto | None) -> bool:
    """Whether a constant-valued tensor's producer yields floats (a DequantizeLinear of an
    integer weight does not count: that weight is already quantized)."""
    if node is None:
        return False
    if node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        return value is not None and value.data_type in _FLOATS
    return node.op_type not in ("DequantizeLinear", "Cast")


def lift_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with constant subgraphs folded and constants as initializers, if any weight
    of a MatMul, Gemm or Conv needs it; else the model itself. Returns notes for the user."""
    found = survey(model)
    if not found.constant_weights:
        return model, []
    import onnx_ir as ir
    import onnxscript.optimizer as optimizer
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

    work = ir.serde.deserialize_model(model)
    # Weights go through whole: no size limit on what the folder may compute.
    optimizer.fold_constants(work, input_size_limit=1 << 30, output_size_limit=1 << 30)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
    RemoveUnusedNodesPass()(work)
    lifted = ir.serde.serialize_model(work)
    done = len(found.constant_weights) - len(survey(lifted).constant_weights)
    if done <= 0:  # nothing the folder could compute (an old opset, say): keep the model
        return model, []
    return lifted, [f"{done} weights held in Constant nodes were lifted to initializers "
                    "(constant subgraphs folded) so the quantizer sees them"]
