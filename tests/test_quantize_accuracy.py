"""STS-B accuracy of quantized MiniLM, whole and per shard, against the fp32 reference.

The fp32 figure (82.03, Spearman x100, mean pooling, normalised, max_length 128) is pinned by
tests/test_evaluate.py on the same data pipeline.
"""

from __future__ import annotations

import onnx
import pytest

from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.model.shapes import resolve_input_shapes
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.planner import make_plan
from periphery_core.quantize.config import DynamicInt8
from periphery_core.quantize.methods import quantize
from periphery_core.quantize.pershard import quantize_plan
from periphery_core.quantize.sources import StsbSource, open_source
from periphery_core.quantize.task_metrics import spearman_sts, spearman_sts_chain
from tests.conftest import MODELS, SHARED_DATA, require_shared

FP32_SPEARMAN = 82.03
# what ONNX Runtime's dynamic INT8 writes in place of a float MatMul
INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention"}


@pytest.fixture(scope="module")
def minilm():
    require_shared()
    loaded = load_model(MODELS / "all-MiniLM-L6-v2" / "model.onnx")
    inputs = resolve_input_shapes(loaded.proto)[0]
    tokenizer = MODELS / "all-MiniLM-L6-v2" / "tokenizer.json"
    source = open_source(f"stsb:{SHARED_DATA / 'datasets' / 'stsb' / 'sts-test.tsv'}"
                         f"?tokenizer={tokenizer}&max_length=128", inputs)
    assert isinstance(source, StsbSource)
    return loaded, source


def _assert_int8(quantized: onnx.ModelProto, fp32: onnx.ModelProto) -> None:
    """The weights really are 8-bit now. The accuracy bounds alone would pass a quantizer that
    changed nothing; MiniLM's MatMul weights are most of its bytes, so INT8 ones leave the
    model under half its fp32 size (about a quarter)."""
    assert quantized.ByteSize() < fp32.ByteSize() / 2, (quantized.ByteSize(), fp32.ByteSize())
    assert any(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
               for t in quantized.graph.initializer), "no 8-bit initializer"
    assert INTEGER_OPS & {n.op_type for n in quantized.graph.node}, "no integer MatMul"


def test_minilm_dynamic_int8_keeps_stsb_spearman_within_one_point(minilm) -> None:
    loaded, source = minilm
    quantized = quantize(loaded, DynamicInt8()).model
    _assert_int8(quantized, loaded.proto)
    score = spearman_sts(quantized, source)
    print(f"\nMiniLM dynamic INT8 STS-B Spearman x100: {score:.2f} (fp32 {FP32_SPEARMAN})")
    assert FP32_SPEARMAN - score <= 1.0


def test_minilm_two_stages_with_only_the_second_quantized(minilm) -> None:
    loaded, source = minilm
    analysis = analyze(loaded, {n: (1, 128) for n in ("input_ids", "attention_mask",
                                                      "token_type_ids")})
    plan = make_plan(analysis, 2)
    shards = quantize_plan(loaded, analysis, plan, {1: DynamicInt8()}, None)
    fp32 = extract_shards(loaded, analysis, plan)
    assert not INTEGER_OPS & {n.op_type for n in shards[0].graph.node}  # left in fp32
    assert shards[0].ByteSize() == fp32[0].ByteSize()
    _assert_int8(shards[1], fp32[1])
    score = spearman_sts_chain(shards, source)
    print(f"\nMiniLM 2 stages, stage 2 dynamic INT8: STS-B Spearman x100 {score:.2f}")
    assert FP32_SPEARMAN - score <= 1.0
