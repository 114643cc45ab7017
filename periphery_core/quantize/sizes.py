"""Size accounting of quantized models: weight bytes by element type, 4-bit storage ratio.

Bytes are read from the tensors' own fields (raw data, or the `length` of external data), so
counting never loads a weight it does not have to.
"""

from __future__ import annotations

import onnx

from periphery_core.quantize.config import QuantizeError


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        length = next((e.value for e in t.external_data if e.key == "length"), "")
        if length:
            return int(length)
    return int(onnx.numpy_helper.to_array(t).nbytes)


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the model's initializers by element type (`float`, `int8`, `uint8`, ...)."""
    totals: dict[str, int] = {}
    for init in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type).lower()
        totals[name] = totals.get(name, 0) + _tensor_bytes(init)
    return totals


def matmul_weight_ratio(fp32: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    """Storage of the 4-bit MatMul weights over the float bytes of the weights they replace.

    The numerator counts every MatMulNBits node's packed weights, scales and zero points; the
    denominator the float weights of the original MatMuls whose weights no MatMul reads any
    more. Packed 4-bit with fp32 scales per block of 32 is about 0.16.

    Raises:
        QuantizeError: the quantized model holds no MatMulNBits node.
    """
    q_inits = {i.name: i for i in quantized.graph.initializer}
    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    if not nbits:
        raise QuantizeError("the quantized model holds no MatMulNBits node")
    stored = sum(
        _tensor_bytes(q_inits[name])
        for n in nbits for name in n.input[1:4] if name in q_inits
    )
    still_float = {n.input[1] for n in quantized.graph.node
                   if n.op_type == "MatMul" and len(n.input) > 1}
    f_inits = {i.name: i for i in fp32.graph.initializer}
    replaced = {n.input[1] for n in fp32.graph.node
                if n.op_type == "MatMul" and n.input[1] in f_inits
                and n.input[1] not in still_float}
    original = sum(_tensor_bytes(f_inits[name]) for name in replaced)
    if original == 0:
        raise QuantizeError("no float MatMul weights were replaced")
    return stored / original
