"""The accuracy report on real models and data: figures pinned to the reference measurements."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from periphery_core.errors import Cancelled, EvaluationError
from periphery_core.model.shapes import resolve_input_shapes
from periphery_core.progress import CancelToken, Progress
from periphery_core.quantize.evaluate import EvalReport, evaluate
from periphery_core.quantize.noise import sqnr_db
from periphery_core.quantize.sensitivity import node_sqnr
from periphery_core.quantize.sources import StsbSource, open_source
from periphery_core.quantize.task_metrics import accuracy, spearman_sts
from tests.conftest import MODELS, SHARED_DATA, require_shared

MNIST = MODELS / "mnist-8.onnx"
MNIST_IMAGES = SHARED_DATA / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz"
MINILM = MODELS / "all-MiniLM-L6-v2" / "model.onnx"
STSB = SHARED_DATA / "datasets" / "stsb" / "sts-test.tsv"
TOKENIZER = MODELS / "all-MiniLM-L6-v2" / "tokenizer.json"


@pytest.fixture(scope="module")
def mnist() -> onnx.ModelProto:
    require_shared()
    return onnx.load(str(MNIST))


def mnist_source(model: onnx.ModelProto, first: int, stop: int):
    inputs = resolve_input_shapes(model)[0]
    return open_source(f"mnist:{MNIST_IMAGES}?range={first}:{stop}", inputs)


def damaged(model: onnx.ModelProto, weight: str, factor: float) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.name == weight:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, weight))
    return copy


def test_identical_models_on_mnist_pin_the_reference_accuracy(mnist: onnx.ModelProto) -> None:
    updates: list[Progress] = []
    report = evaluate(MNIST, MNIST, mnist_source(mnist, 200, 10000), per_node=3,
                      latency_runs=5, progress=updates.append)
    assert report.samples == 9800
    (out,) = report.outputs
    assert out.name == "Plus214_Output_0"
    assert out.cosine == 1.0 and out.max_abs == 0.0 and out.sqnr_db == math.inf
    assert report.top1_agreement == 1.0
    assert report.task_metric is not None
    name, fp32, quant = report.task_metric
    assert "accuracy" in name and fp32 == quant
    # 9692 of 9800 correct. The data README's 98.91% is one image more (9693); with pixels
    # in [0, 1] or raw 0-255 this model gets exactly 9692 right on images 200..9999 (98.91% is
    # what raw pixels give on all 10,000). The nearest wrong class is 0.008 logits away, far
    # above float rounding, so the count does not move with kernels or threads.
    assert fp32 == pytest.approx(100 * 9692 / 9800, abs=1e-9)
    assert fp32 == pytest.approx(98.91, abs=0.015)
    assert report.fp32_bytes == report.quant_bytes == MNIST.stat().st_size
    assert report.size_ratio == 1.0
    assert report.fp32_latency_s > 0 and report.quant_latency_s > 0
    assert report.latency_ratio > 0
    assert all(n.sqnr_db == math.inf for n in report.sensitive_nodes)
    assert {u.task for u in updates} == {"Evaluating", "Timing", "Per-node SQNR"}
    assert updates[0].done == 0 and any(u.done == 9800 for u in updates)


def test_damaged_conv_is_ranked_most_sensitive(mnist: onnx.ModelProto) -> None:
    bad = damaged(mnist, "Parameter87", 1.01)  # the second Conv's weights, 1% too large
    nodes = node_sqnr(mnist, bad, mnist_source(mnist, 0, 100).batches(1), limit=20)
    by_tensor = {n.tensor: n for n in nodes}
    assert nodes[0].node == "Convolution110" and nodes[0].op_type == "Conv"
    # Scaling by 1.01 is noise of 1% of the signal: 40 dB exactly.
    assert nodes[0].sqnr_db == pytest.approx(40.0, abs=0.01)
    for before in ("Convolution28_Output_0", "Plus30_Output_0", "Pooling66_Output_0"):
        assert by_tensor[before].sqnr_db == math.inf
    for after in ("Plus112_Output_0", "ReLU114_Output_0", "Times212_Output_0",
                  "Plus214_Output_0"):
        assert 30 < by_tensor[after].sqnr_db < 45
    report = evaluate(mnist, bad, mnist_source(mnist, 0, 100), per_node=2, latency_runs=2)
    assert report.sensitive_nodes[0].node == "Convolution110"
    assert len(report.sensitive_nodes) == 2
    (out,) = report.outputs
    assert 30 < out.sqnr_db < 45 and 0.999 < out.cosine < 1 and out.max_abs > 0
    assert report.fp32_bytes > 0 and report.quant_bytes > 0


def test_badly_damaged_model_loses_accuracy_and_agreement(mnist: onnx.ModelProto) -> None:
    bad = damaged(mnist, "Parameter5", -1.0)  # the first Conv's weights negated
    report = evaluate(mnist, bad, mnist_source(mnist, 0, 300), per_node=0, latency_runs=2)
    assert report.task_metric is not None
    _, fp32, quant = report.task_metric
    assert quant < fp32 - 20
    assert report.top1_agreement is not None and report.top1_agreement < 0.8
    assert report.sensitive_nodes == ()
    assert accuracy(bad, mnist_source(mnist, 0, 300)) == pytest.approx(quant)


def test_cancel_stops_between_batches(mnist: onnx.ModelProto) -> None:
    token = CancelToken()
    seen: list[int] = []

    def progress(update: Progress) -> None:
        seen.append(update.done)
        if update.done >= 10:
            token.cancel()

    with pytest.raises(Cancelled):
        evaluate(MNIST, MNIST, mnist_source(mnist, 0, 10000), progress=progress, cancel=token)
    assert max(seen) == 10


def test_task_and_model_errors(mnist: onnx.ModelProto) -> None:
    random = open_source("random", resolve_input_shapes(mnist)[0], samples=4)
    with pytest.raises(EvaluationError, match="has no labels"):
        evaluate(mnist, mnist, random, task="classification")
    with pytest.raises(EvaluationError, match="needs STS-B data"):
        evaluate(mnist, mnist, random, task="sts")
    with pytest.raises(EvaluationError, match="unknown task"):
        evaluate(mnist, mnist, random, task="bleu")
    renamed = onnx.ModelProto()
    renamed.CopyFrom(mnist)
    renamed.graph.output[0].name = "logits"
    renamed.graph.node[-1].output[0] = "logits"
    with pytest.raises(EvaluationError, match="no output 'Plus214_Output_0'"):
        evaluate(mnist, renamed, random)
    report = evaluate(mnist, mnist, random, per_node=0, latency_runs=1)
    assert report.task_metric is None and report.samples == 4


def test_sqnr_definition() -> None:
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    report = EvalReport((), None, None, 400, 100, 2.0, 1.0, 1, ())
    assert report.size_ratio == 0.25 and report.latency_ratio == 0.5


@pytest.fixture(scope="module")
def stsb() -> StsbSource:
    require_shared()
    inputs = resolve_input_shapes(onnx.load(str(MINILM), load_external_data=False))[0]
    source = open_source(f"stsb:{STSB}?tokenizer={TOKENIZER}&max_length=128", inputs)
    assert isinstance(source, StsbSource)
    return source


def test_minilm_stsb_spearman_matches_the_reference(stsb: StsbSource) -> None:
    # All 1,379 pairs: about 25 s on 2 cores.
    assert spearman_sts(MINILM, stsb, batch_size=32) == pytest.approx(82.03, abs=0.05)


def test_sts_task_in_the_report(stsb: StsbSource) -> None:
    inputs = resolve_input_shapes(onnx.load(str(MINILM), load_external_data=False))[0]
    subset = open_source(f"stsb:{STSB}?tokenizer={TOKENIZER}", inputs, samples=40)
    assert isinstance(subset, StsbSource)
    report = evaluate(MINILM, MINILM, subset, batch_size=16, per_node=2, node_samples=4,
                      latency_runs=2)
    assert report.samples == 40
    assert report.task_metric is not None
    name, fp32, quant = report.task_metric
    assert "Spearman" in name and fp32 == quant
    assert fp32 == pytest.approx(spearman_sts(MINILM, subset, batch_size=16))
    assert report.top1_agreement is None
    assert report.outputs[0].sqnr_db == math.inf
    assert report.fp32_bytes == MINILM.stat().st_size
    assert len(report.sensitive_nodes) == 2


def test_node_sqnr_reads_quantized_tensors_through_their_qdq_pair(tmp_path: Path,
                                                                  mnist: onnx.ModelProto) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    source = mnist_source(mnist, 0, 50)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = source.batches(1)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    target = tmp_path / "mnist-qdq.onnx"
    quantize_static(str(MNIST), str(target), Reader(), quant_format=QuantFormat.QDQ)
    nodes = node_sqnr(MNIST, target, mnist_source(mnist, 50, 100).batches(1), limit=50)
    # The quantizer folds each Relu into its Add and gives the Add the Relu's output name:
    # compared after the Q/DQ pair, the values still mean the same thing (no negative SQNR).
    assert {"ReLU32_Output_0", "ReLU114_Output_0"} <= {n.tensor for n in nodes}
    assert all(20 < n.sqnr_db < math.inf for n in nodes if n.tensor != "Parameter193_reshape1")
