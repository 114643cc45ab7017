"""Per-node FLOP estimates, the compute half of the per-node cost model.

The analysis module asks this module how much arithmetic one ONNX node does, so the planner can
balance pipeline stages. The estimate is deliberately coarse and *total*: every node gets a
non-negative integer, whatever is known about it. Each operator family has a closed formula over
concrete shapes; when a shape the formula needs is unknown, the node degrades to its output
element count (a cheap elementwise guess), or 0 when even that is unknown. Nothing here raises
for a malformed or unusual node, because one odd node must not stop a whole model's analysis.

A multiply-add counts as 2 FLOPs. The formulas (``out``/``in`` are element counts of the first
output/input, ``k`` the kernel's spatial product, ``H`` a hidden size, ``G`` gates per step):

=============================  ==================================================================
Conv / ConvInteger /           2 * out * (Cin / group) * k  (+ out for a bias)
QLinearConv / FusedConv        (FusedConv: + out for its activation)
ConvTranspose                  2 * in * (Cout / group) * k  (+ out for a bias)
MatMul & friends               2 * batch * M * K * N, batch dims broadcast, 1-D operands promoted
Gemm                           2 * M * K * N  (+ M * N for C)
MatMulNBits                    2 * rows(A) * K * N  (+ rows * N for a bias)
Einsum                         2 * product of every distinct index size (1 operand: no factor 2)
attention core                 QK^T 2*B*Sq*Skv*Dqk + AV 2*B*Sq*Skv*Dv + 6 per score (scale+softmax)
com.microsoft Attention        input projection 2*B*S*Hin*(Dq+Dk+Dv) (+ bias) + attention core
LSTM / GRU / RNN               steps * batch * dirs * (2*G*H*(I+H) + G*H (+ 2*G*H bias) + e*H),
                               G = 4 / 3 / 1, e = 9 / 8 / 1 elementwise gate work per hidden unit
pooling with a kernel          out * k;  global pooling: in
normalisation, softmax, ...    out * per-element cost (table ``_PER_OUTPUT_ELEMENT``)
reductions, ArgMax, CumSum     in (ReduceL2, ReduceSumSquare, ReduceLogSumExp: 2 * in)
variadic elementwise           out * (inputs - 1)   (Mean: out * inputs)
Resize / Upsample              out * 1 (nearest), 2^(a+1) (linear), 2 * 4^a (cubic), a = scaled axes
data movement                  0
If / Loop / Scan               max(branches) / body * trip count / body * scan length
anything else                  out
=============================  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

ShapeOf = Callable[[str], "tuple[int, ...] | None"]
ValueOf = Callable[[str], "np.ndarray | None"]

_MS_DOMAIN = "com.microsoft"

# Per-element costs. Transcendentals (exp, erf, tanh, ...) cost a few FLOPs in any libm, so they
# weigh more than an add; the exact constant matters far less than being consistent.
_CHEAP = 1
_TRANSCENDENTAL = 4
_GELU = 8  # 0.5 * x * (1 + erf(x / sqrt(2))): one erf and a handful of arithmetic
_SOFTMAX = 5  # max, subtract, exp, sum, divide
_LAYER_NORM = 5  # mean, subtract, variance, normalise, scale and shift
_RMS_NORM = 4  # square, mean, rsqrt scale, gamma
_ATTENTION_SCORE = _SOFTMAX + 1  # scale each score, then softmax it

# A Loop trip count this large is the "run until the condition says stop" sentinel, not a count.
_MAX_PLAUSIBLE_TRIPS = 2**31

# Operator tables, one name per entry, kept dense so a reader can scan them.
# fmt: off
_ZERO_COST = frozenset(
    {
        "Cast", "CastLike", "Compress", "Concat", "ConcatFromSequence", "Constant",
        "ConstantOfShape", "DepthToSpace", "Dropout", "Expand", "EyeLike", "Flatten", "Gather",
        "GatherElements", "GatherND", "Identity", "MaxUnpool", "NonZero", "OneHot", "Optional",
        "OptionalGetElement", "OptionalHasElement", "Pad", "Range", "Reshape", "ReverseSequence",
        "Scatter", "ScatterElements", "ScatterND", "SequenceAt", "SequenceConstruct",
        "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "Shape", "Size",
        "Slice", "SpaceToDepth", "Split", "SplitToSequence", "Squeeze", "Tile", "Transpose",
        "Trilu", "Unsqueeze",
    }
)

_PER_OUTPUT_ELEMENT: dict[str, int] = {
    # cheap unary, comparisons and selections
    **dict.fromkeys(
        (
            "Abs", "Ceil", "Clip", "Floor", "HardSigmoid", "IsInf", "IsNaN", "LeakyRelu", "Neg",
            "Not", "Reciprocal", "Relu", "Round", "Shrink", "Sign", "Sqrt", "ThresholdedRelu",
            "Where", "Hardmax", "QLinearAdd", "QLinearMul", "BitwiseNot",
        ),
        _CHEAP,
    ),
    "HardSwish": 3,
    "QuantizeLinear": 2,
    "DequantizeLinear": 2,
    "DynamicQuantizeLinear": 4,
    # transcendental activations
    **dict.fromkeys(
        (
            "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Celu", "Cos", "Cosh", "Elu",
            "Erf", "Exp", "Log", "Selu", "Sigmoid", "Sin", "Sinh", "Softplus", "Softsign", "Tan",
            "Tanh", "QLinearSigmoid",
        ),
        _TRANSCENDENTAL,
    ),
    "Gelu": _GELU,
    "QuickGelu": _TRANSCENDENTAL + 1,
    "Mish": 2 * _TRANSCENDENTAL + 1,
    "Swish": _TRANSCENDENTAL + 1,
    "BiasGelu": _GELU + 1,
    "BiasAdd": 2,
    "BiasSoftmax": _SOFTMAX + 1,
    "RotaryEmbedding": 3,
    # normalisations and softmax
    "BatchNormalization": 2,  # folds to x * a + b at inference
    "InstanceNormalization": _LAYER_NORM,
    "LayerNormalization": _LAYER_NORM,
    "GroupNormalization": _LAYER_NORM,
    "MeanVarianceNormalization": _LAYER_NORM,
    "SimplifiedLayerNormalization": _RMS_NORM,
    "RMSNormalization": _RMS_NORM,
    "LpNormalization": 3,
    "Softmax": _SOFTMAX,
    "LogSoftmax": _SOFTMAX + 1,
}

_VARIADIC = frozenset(
    {
        "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal",
        "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Or",
        "Pow", "PRelu", "Sub", "Sum", "Xor",
    }
)

_PER_INPUT_ELEMENT: dict[str, int] = {
    **dict.fromkeys(
        (
            "ArgMax", "ArgMin", "CumSum", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
            "ReduceL1", "ReduceLogSum", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
            "ReduceSum", "TopK",
        ),
        1,
    ),
    "ReduceL2": 2,
    "ReduceLogSumExp": 2,
    "ReduceSumSquare": 2,
}
# fmt: on

# (gates per step, elementwise FLOPs per hidden unit per step: activations, cell/state update)
_RECURRENT = {"LSTM": (4, 9), "GRU": (3, 8), "RNN": (1, 1)}


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Numpy-style broadcast, lenient: incompatible dims take the larger one instead of failing."""
    rank = max(len(a), len(b))
    pa = (1,) * (rank - len(a)) + a
    pb = (1,) * (rank - len(b)) + b
    return tuple(y if x == 1 else x if y == 1 else max(x, y) for x, y in zip(pa, pb, strict=True))


@dataclass(frozen=True, slots=True)
class _NodeView:
    """One node plus the caller's lookups, with the None/absent-input handling in one place."""

    node: onnx.NodeProto
    shape_of: ShapeOf
    value_of: ValueOf

    def has_input(self, index: int) -> bool:
        return index < len(self.node.input) and self.node.input[index] != ""

    def _shape(self, name: str) -> tuple[int, ...] | None:
        if not name:
            return None
        try:
            shape = self.shape_of(name)
        except (KeyError, IndexError):
            return None
        if shape is None:
            return None
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            return None
        # A negative dim is a "don't know" marker that slipped through, not a size.
        return None if any(d < 0 for d in dims) else dims

    def in_shape(self, index: int) -> tuple[int, ...] | None:
        return self._shape(self.node.input[index]) if self.has_input(index) else None

    def out_shape(self, index: int = 0) -> tuple[int, ...] | None:
        if index >= len(self.node.output):
            return None
        return self._shape(self.node.output[index])

    def in_elems(self, index: int = 0) -> int | None:
        shape = self.in_shape(index)
        return None if shape is None else _numel(shape)

    def out_elems(self, index: int = 0) -> int | None:
        shape = self.out_shape(index)
        return None if shape is None else _numel(shape)

    def elementwise_elems(self) -> int | None:
        """Output elements, else the broadcast of the known input shapes."""
        out = self.out_elems()
        if out is not None:
            return out
        shapes = (self.in_shape(i) for i in range(len(self.node.input)))
        known = [s for s in shapes if s is not None]
        if not known:
            return None
        shape: tuple[int, ...] = ()
        for s in known:
            shape = _broadcast(shape, s)
        return _numel(shape)

    def scalar(self, index: int) -> int | None:
        """The input's constant value as one integer, when it is a known constant."""
        if not self.has_input(index):
            return None
        try:
            value = self.value_of(self.node.input[index])
        except (KeyError, IndexError):
            return None
        if value is None:
            return None
        flat = np.asarray(value).reshape(-1)
        return int(flat[0]) if flat.size >= 1 else None

    def attr(self, name: str, default: Any = None) -> Any:
        for attribute in self.node.attribute:
            if attribute.name == name:
                return helper.get_attribute_value(attribute)
        return default

    def attr_int(self, name: str, default: int) -> int:
        value = self.attr(name)
        return int(value) if isinstance(value, (int, np.integer)) else default

    def attr_ints(self, name: str) -> tuple[int, ...]:
        value = self.attr(name)
        return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else ()

    def attr_str(self, name: str, default: str) -> str:
        value = self.attr(name)
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else default


_Estimator = Callable[[_NodeView], "int | None"]


# --- convolution ------------------------------------------------------------------------------


def _conv(view: _NodeView, x_idx: int, w_idx: int, bias_idx: int | None) -> int | None:
    x, w, y = view.in_shape(x_idx), view.in_shape(w_idx), view.out_shape()
    group = max(1, view.attr_int("group", 1))
    kernel = w[2:] if w is not None and len(w) >= 2 else view.attr_ints("kernel_shape")
    if w is not None and len(w) >= 2:
        cin_per_group: int | None = w[1]
    elif x is not None and len(x) >= 2:
        cin_per_group = x[1] // group
    else:
        cin_per_group = None
    out = _numel(y) if y is not None else None
    if out is None and x is not None and w is not None and len(x) >= 2 and len(w) >= 1:
        # Output not inferred: same spatial size shrunk by the strides is close enough.
        strides = view.attr_ints("strides") or (1,) * (len(x) - 2)
        out = x[0] * w[0] * _numel(x[2:]) // max(1, _numel(strides))
    if out is None or cin_per_group is None or (not kernel and w is None):
        return None
    flops = 2 * out * cin_per_group * _numel(kernel)
    if bias_idx is not None and view.has_input(bias_idx):
        flops += out
    return flops


def _conv_transpose(view: _NodeView) -> int | None:
    x, w, y = view.in_shape(0), view.in_shape(1), view.out_shape()
    group = max(1, view.attr_int("group", 1))
    kernel = w[2:] if w is not None and len(w) >= 2 else view.attr_ints("kernel_shape")
    if w is not None and len(w) >= 2:
        cout_per_group: int | None = w[1]
    elif y is not None and len(y) >= 2:
        cout_per_group = y[1] // group
    else:
        cout_per_group = None
    if x is None or cout_per_group is None or (not kernel and w is None):
        return None
    flops = 2 * _numel(x) * cout_per_group * _numel(kernel)
    if view.has_input(2) and y is not None:
        flops += _numel(y)
    return flops


def _fused_conv(view: _NodeView) -> int | None:
    conv = _conv(view, 0, 1, 2)
    if conv is None:
        return None
    out = view.out_elems() or 0
    return conv + out + (out if view.has_input(3) else 0)  # activation, then the optional sum Z


# --- matrix products --------------------------------------------------------------------------


def _matmul_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    if not a or not b:
        return None
    a2 = (1, a[0]) if len(a) == 1 else a
    b2 = (b[0], 1) if len(b) == 1 else b
    m, k, n = a2[-2], a2[-1], b2[-1]
    return 2 * _numel(_broadcast(a2[:-2], b2[:-2])) * m * k * n


def _matmul(view: _NodeView, a_idx: int = 0, b_idx: int = 1) -> int | None:
    a, b = view.in_shape(a_idx), view.in_shape(b_idx)
    if a is not None and b is not None:
        return _matmul_shapes(a, b)
    # One operand is enough to know K; the output gives the rest.
    out = view.out_elems()
    k = a[-1] if a else (b[-2] if b and len(b) >= 2 else (b[0] if b else None))
    return None if out is None or k is None else 2 * out * k


def _swap_last_two(shape: tuple[int, ...] | None, swap: bool) -> tuple[int, ...] | None:
    if shape is None or not swap or len(shape) < 2:
        return shape
    return (*shape[:-2], shape[-1], shape[-2])


def _fused_matmul(view: _NodeView) -> int | None:
    a = _swap_last_two(view.in_shape(0), bool(view.attr_int("transA", 0)))
    b = _swap_last_two(view.in_shape(1), bool(view.attr_int("transB", 0)))
    if a is None or b is None:
        return _matmul(view)
    return _matmul_shapes(a, b)


def _gemm(view: _NodeView) -> int | None:
    a = _swap_last_two(view.in_shape(0), bool(view.attr_int("transA", 0)))
    b = _swap_last_two(view.in_shape(1), bool(view.attr_int("transB", 0)))
    bias = view.has_input(2)
    if a is not None and b is not None and len(a) == 2 and len(b) == 2:
        m, n = a[0], b[1]
        return 2 * m * a[1] * n + (m * n if bias else 0)
    out = view.out_elems()
    k = a[-1] if a else (b[0] if b else None)
    if out is None or k is None:
        return None
    return 2 * out * k + (out if bias else 0)


def _fused_gemm(view: _NodeView) -> int | None:
    gemm = _gemm(view)
    return None if gemm is None else gemm + (view.out_elems() or 0)  # + activation


def _matmul_nbits(view: _NodeView) -> int | None:
    a = view.in_shape(0)
    k = view.attr_int("K", a[-1] if a else 0)
    n = view.attr_int("N", 0)
    if a is None or not a or n <= 0:
        return None
    rows = _numel(a[:-1])
    return 2 * rows * k * n + (rows * n if view.has_input(5) else 0)


def _einsum(view: _NodeView) -> int | None:
    equation = view.attr_str("equation", "").replace(" ", "")
    terms = equation.split("->")[0].split(",")
    if not equation or len(terms) != len(view.node.input):
        return None
    sizes: dict[str, int] = {}
    ellipsis: tuple[int, ...] = ()
    for index, term in enumerate(terms):
        shape = view.in_shape(index)
        if shape is None:
            return None
        head, _, tail = term.partition("...")
        if len(head) + len(tail) > len(shape):
            return None
        tail_dims = shape[len(shape) - len(tail) :]
        for letter, dim in (*zip(head, shape, strict=False), *zip(tail, tail_dims, strict=True)):
            sizes[letter] = max(sizes.get(letter, 1), dim)
        if "..." in term:
            ellipsis = _broadcast(ellipsis, shape[len(head) : len(shape) - len(tail)])
    points = _numel(sizes.values()) * _numel(ellipsis)
    # One operand is a sum/trace/transpose: one add per point, no multiply.
    return points if len(terms) == 1 else 2 * points


# --- attention --------------------------------------------------------------------------------


def _attention_core(
    batch: int, heads: int, q_len: int, kv_len: int, qk_width: int, v_width: int
) -> int:
    """QK^T, scaled softmax and AV; the widths are summed over all query heads."""
    scores = 2 * batch * q_len * kv_len * qk_width
    mixing = 2 * batch * q_len * kv_len * v_width
    return scores + mixing + _ATTENTION_SCORE * batch * heads * q_len * kv_len


def _ms_attention(view: _NodeView) -> int | None:
    x, w = view.in_shape(0), view.in_shape(1)
    if x is None or len(x) != 3:
        return None
    batch, seq, hidden_in = x
    heads = max(1, view.attr_int("num_heads", 1))
    qkv = view.attr_ints("qkv_hidden_sizes")
    if len(qkv) != 3:
        if w is None or len(w) != 2:
            return None
        qkv = (w[1] // 3,) * 3
    past = view.in_shape(4)  # (2, batch, heads, past_len, head_size)
    past_len = past[3] if past is not None and len(past) == 5 else 0
    projection = 2 * batch * seq * hidden_in * sum(qkv)
    if view.has_input(2):
        projection += batch * seq * sum(qkv)
    return projection + _attention_core(batch, heads, seq, seq + past_len, qkv[0], qkv[2])


def _multi_head_attention(view: _NodeView) -> int | None:
    q, k, v = view.in_shape(0), view.in_shape(1), view.in_shape(2)
    heads = max(1, view.attr_int("num_heads", 1))
    if q is None:
        return None
    if len(q) == 5:  # packed (batch, seq, heads, 3, head_size)
        batch, seq = q[0], q[1]
        q_width = q[2] * q[4]
        kv_len_new, k_width, v_width = seq, q_width, q_width
    elif len(q) == 3:
        batch, seq, q_width = q
        if k is None:
            return None
        if len(k) == 5:  # packed KV (batch, kv_seq, heads, 2, head_size)
            kv_len_new, k_width = k[1], k[2] * k[4]
        elif len(k) == 4:  # (batch, heads, kv_seq, head_size)
            kv_len_new, k_width = k[2], k[1] * k[3]
        elif len(k) == 3:
            kv_len_new, k_width = k[1], k[2]
        else:
            return None
        v_width = k_width
        if v is not None and len(v) == 3:
            v_width = v[2]
        elif v is not None and len(v) == 4:
            v_width = v[1] * v[3]
    else:
        return None
    past = view.in_shape(6)  # past_key (batch, heads, past_len, head_size)
    past_len = past[2] if past is not None and len(past) == 4 else 0
    flops = _attention_core(batch, heads, seq, kv_len_new + past_len, q_width, v_width)
    if view.has_input(3):  # bias added to the new Q, K and V
        flops += batch * seq * q_width + batch * kv_len_new * (k_width + v_width)
    return flops


def _group_query_attention(view: _NodeView) -> int | None:
    q = view.in_shape(0)
    if q is None or len(q) != 3:
        return None
    batch, seq, width = q
    heads = max(1, view.attr_int("num_heads", 1))
    kv_heads = max(1, view.attr_int("kv_num_heads", heads))
    # Without a separate key the query is packed QKV: heads + 2 * kv_heads head slices.
    head_size = width // heads if view.has_input(1) else width // (heads + 2 * kv_heads)
    total = view.scalar(6)
    if total is None:
        past = view.in_shape(3)  # (batch, kv_heads, past_len, head_size)
        total = seq + (past[2] if past is not None and len(past) == 4 else 0)
    flops = _attention_core(batch, heads, seq, total, heads * head_size, heads * head_size)
    if view.attr_int("do_rotary", 0):
        flops += 3 * batch * seq * (heads + kv_heads) * head_size
    return flops


def _onnx_attention(view: _NodeView) -> int | None:
    """ONNX Attention (opset 23): Q/K/V as (B, heads, S, d) or (B, S, hidden)."""
    q, k, v = view.in_shape(0), view.in_shape(1), view.in_shape(2)
    if q is None or k is None:
        return None
    if len(q) == 4:
        batch, heads, seq, q_width = q[0], q[1], q[2], q[1] * q[3]
    elif len(q) == 3:
        heads = max(1, view.attr_int("q_num_heads", 1))
        batch, seq, q_width = q
    else:
        return None
    kv_heads = max(1, view.attr_int("kv_num_heads", k[1] if len(k) == 4 else 1))
    if len(k) == 4:
        kv_len = k[2]
    elif len(k) == 3:
        kv_len = k[1]
    else:
        return None
    # Grouped K/V heads are shared, but each query head still multiplies against them.
    if v is not None and len(v) == 4:
        v_width = heads * v[3]
    elif v is not None and len(v) == 3:
        v_width = heads * (v[2] // kv_heads)
    else:
        v_width = q_width
    past = view.in_shape(4)
    past_len = past[2] if past is not None and len(past) == 4 else 0
    return _attention_core(batch, heads, seq, kv_len + past_len, q_width, v_width)


def _embed_layer_norm(view: _NodeView) -> int | None:
    elems = view.out_elems()
    if elems is None:
        ids, table = view.in_shape(0), view.in_shape(2)
        if ids is None or table is None or len(table) != 2:
            return None
        elems = _numel(ids) * table[1]
    embeddings = 2 + (1 if view.has_input(4) else 0)  # word + position (+ segment)
    return elems * (embeddings - 1 + _LAYER_NORM)


def _skip_norm(norm_cost: int) -> _Estimator:
    def estimate(view: _NodeView) -> int | None:
        elems = view.elementwise_elems()
        if elems is None:
            return None
        return elems * (norm_cost + 1 + (1 if view.has_input(4) else 0))  # skip (+ bias) add

    return estimate


# --- recurrent --------------------------------------------------------------------------------


def _recurrent(view: _NodeView) -> int | None:
    gates, elementwise = _RECURRENT[view.node.op_type]
    x, w, r = view.in_shape(0), view.in_shape(1), view.in_shape(2)
    if x is None or len(x) != 3:
        return None
    seq, batch = (x[1], x[0]) if view.attr_int("layout", 0) else (x[0], x[1])
    input_size = x[2]
    hidden = view.attr_int("hidden_size", 0)
    if hidden <= 0 and r is not None and len(r) == 3:
        hidden = r[2]
    if hidden <= 0:
        return None
    bidirectional = view.attr_str("direction", "forward") == "bidirectional"
    directions = 2 if bidirectional else (w[0] if w is not None and len(w) == 3 else 1)
    step = 2 * gates * hidden * (input_size + hidden)  # W x and R h
    step += gates * hidden  # W x + R h
    if view.has_input(3):
        step += 2 * gates * hidden  # W and R biases
    step += elementwise * hidden
    return seq * batch * directions * step


# --- pooling, resizing, elementwise -----------------------------------------------------------


def _kernel_pool(view: _NodeView) -> int | None:
    kernel = view.attr_ints("kernel_shape")
    out = view.out_elems()
    if out is None:
        return view.in_elems()
    return out * _numel(kernel)


def _lrn(view: _NodeView) -> int | None:
    elems = view.elementwise_elems()
    return None if elems is None else elems * (view.attr_int("size", 1) + 3)


def _resize(view: _NodeView) -> int | None:
    x, y = view.in_shape(0), view.out_shape()
    if y is None:
        return None
    scaled_axes = 2
    if x is not None and len(x) == len(y):
        scaled_axes = sum(1 for a, b in zip(x, y, strict=True) if a != b)
    mode = view.attr_str("mode", "nearest")
    if mode in ("linear", "bilinear"):
        per_element = 2 ** (scaled_axes + 1)
    elif mode == "cubic":
        per_element = 2 * 4**scaled_axes
    else:
        per_element = 1
    return _numel(y) * per_element


def _variadic(view: _NodeView) -> int | None:
    elems = view.elementwise_elems()
    inputs = sum(1 for name in view.node.input if name)
    return None if elems is None else elems * max(1, inputs - 1)


def _mean(view: _NodeView) -> int | None:
    elems = view.elementwise_elems()
    inputs = sum(1 for name in view.node.input if name)
    return None if elems is None else elems * max(1, inputs)


def _fast_gelu(view: _NodeView) -> int | None:
    elems = view.elementwise_elems()
    return None if elems is None else elems * (_GELU + (1 if view.has_input(1) else 0))


def _per_output(cost: int) -> _Estimator:
    def estimate(view: _NodeView) -> int | None:
        elems = view.elementwise_elems()
        return None if elems is None else elems * cost

    return estimate


def _per_input(cost: int) -> _Estimator:
    def estimate(view: _NodeView) -> int | None:
        elems = view.in_elems()
        if elems is None:
            elems = view.out_elems()
        return None if elems is None else elems * cost

    return estimate


# --- control flow -----------------------------------------------------------------------------


def _graph_flops(graph: onnx.GraphProto, view: _NodeView) -> int:
    return sum(node_flops(inner, view.shape_of, view.value_of) for inner in graph.node)


def _branch_flops(view: _NodeView, name: str) -> int:
    graph = view.attr(name)
    return _graph_flops(graph, view) if isinstance(graph, onnx.GraphProto) else 0


def _if(view: _NodeView) -> int | None:
    return max(_branch_flops(view, "then_branch"), _branch_flops(view, "else_branch"))


def _loop(view: _NodeView) -> int | None:
    trips = view.scalar(0)
    if trips is None or trips >= _MAX_PLAUSIBLE_TRIPS:
        trips = 1
    return max(0, trips) * _branch_flops(view, "body")


def _scan(view: _NodeView) -> int | None:
    scan_inputs = view.attr_int("num_scan_inputs", 1)
    first = len(view.node.input) - scan_inputs
    length = 1
    shape = view.in_shape(first) if first >= 0 else None
    if shape:
        axes = view.attr_ints("scan_input_axes")
        axis = axes[0] if axes else 0
        if -len(shape) <= axis < len(shape):
            length = shape[axis]
    return length * _branch_flops(view, "body")


def _unknown(view: _NodeView) -> int | None:
    # Ops we do not know still carry the cost of any subgraph they run (e.g. SequenceMap).
    bodies = sum(
        _graph_flops(attribute.g, view)
        for attribute in view.node.attribute
        if attribute.type == onnx.AttributeProto.GRAPH
    )
    return (view.out_elems() or 0) + bodies


# --- dispatch ---------------------------------------------------------------------------------

_STANDARD: dict[str, _Estimator] = {
    **dict.fromkeys(_ZERO_COST, lambda _view: 0),
    **{op: _per_output(cost) for op, cost in _PER_OUTPUT_ELEMENT.items()},
    **{op: _per_input(cost) for op, cost in _PER_INPUT_ELEMENT.items()},
    **dict.fromkeys(_VARIADIC, _variadic),
    **dict.fromkeys(_RECURRENT, _recurrent),
    "Mean": _mean,
    "Conv": lambda view: _conv(view, 0, 1, 2),
    "ConvInteger": lambda view: _conv(view, 0, 1, None),
    "QLinearConv": lambda view: _conv(view, 0, 3, 8),
    "ConvTranspose": _conv_transpose,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": lambda view: _matmul(view, 0, 3),
    "Gemm": _gemm,
    "Einsum": _einsum,
    "Attention": _onnx_attention,
    "MaxPool": _kernel_pool,
    "AveragePool": _kernel_pool,
    "LpPool": _kernel_pool,
    "LRN": _lrn,
    "Resize": _resize,
    "Upsample": _resize,
    "If": _if,
    "Loop": _loop,
    "Scan": _scan,
}

_MICROSOFT: dict[str, _Estimator] = {
    "Attention": _ms_attention,
    "MultiHeadAttention": _multi_head_attention,
    "GroupQueryAttention": _group_query_attention,
    "EmbedLayerNormalization": _embed_layer_norm,
    "SkipLayerNormalization": _skip_norm(_LAYER_NORM),
    "SkipSimplifiedLayerNormalization": _skip_norm(_RMS_NORM),
    "FastGelu": _fast_gelu,
    "FusedConv": _fused_conv,
    "FusedGemm": _fused_gemm,
    "FusedMatMul": _fused_matmul,
    "MatMulNBits": _matmul_nbits,
    "MatMulInteger16": _matmul,
    "MatMulIntegerToFloat": _matmul,
    "DynamicQuantizeMatMul": _matmul,
}


def node_flops(node: onnx.NodeProto, shape_of: ShapeOf, value_of: ValueOf) -> int:
    """Estimate the floating-point operations one node performs.

    A multiply-add counts as 2. Nodes with subgraphs (If, Loop, Scan) carry the cost of their
    bodies, estimated recursively with the same lookups. Any lookup may return None; the
    estimate then falls back to the output element count, or 0 when that is unknown too.

    Args:
        node: The node to estimate. Empty input names are absent optional inputs.
        shape_of: Concrete shape of a tensor by name (top-level or inside a subgraph), or None.
        value_of: Constant value of a tensor (initializer or Constant output), or None.

    Returns:
        A non-negative FLOP estimate. Never raises for odd or partially known nodes.
    """
    view = _NodeView(node, shape_of, value_of)
    estimator = _MICROSOFT.get(node.op_type) if node.domain == _MS_DOMAIN else None
    if estimator is None:
        estimator = _STANDARD.get(node.op_type, _unknown)
    try:
        flops = estimator(view)
    except (ArithmeticError, LookupError, TypeError, ValueError):
        # A node whose attributes or shapes contradict its op's schema gets the cheap guess
        # rather than aborting the analysis of the whole model.
        flops = None
    if flops is None:
        flops = view.out_elems() or 0
    return max(0, int(flops))
