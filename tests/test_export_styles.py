"""Models as other exporters write them, through `periphery` as a user runs it.

One test per class of real-world failure: symbolic image sizes, paddle2onnx's -1 dims and
Constant-held weights, control flow on an input's value, already-quantized models, an ONNX
Runtime GenAI folder, and one `.npz` of feeds taken everywhere data is. Small models come from
`tests.models`; the LLM folder from ../shared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.model.shapes import resolve_input_shapes
from periphery_core.quantize.prepare import survey
from periphery_core.quantize.sources import open_source
from tests import models
from tests.conftest import MODELS, require_shared
from tests.test_cli import cli, ok

SMOLLM = MODELS / "smollm2-135m-instruct-int4"


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _one_line_error(result, *words: str) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    text = " ".join(result.stderr.split())  # rich may wrap the one line on a narrow terminal
    for word in words:
        assert word in text, text
    return text


# --------------------------------------------------------------------- symbolic spatial dims


def test_symbolic_image_size_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    path = _save(models.symbolic_spatial(), tmp_path / "det.onnx")
    failed = cli("shard", path, "--shards", "2", "-o", tmp_path / "out")
    _one_line_error(failed, "'images'", "height, width", "--input-shape images=1x3xHEIGHTxWIDTH")
    assert "internal error" not in failed.stderr
    ok("shard", path, "--shards", "2", "--input-shape", "images=1x3x32x48", "-o", tmp_path / "s")
    assert "PASS" in ok("verify", path, tmp_path / "s", "--exact").stdout


def test_image_size_from_export_metadata(tmp_path: Path) -> None:
    model = models.symbolic_spatial()
    helper.set_model_props(model, {"imgsz": "[32, 48]", "stride": "32"})
    loaded = load_model(_save(model, tmp_path / "yolo.onnx"))
    assert analyze(loaded).input_shapes["images"] == (1, 3, 32, 48)
    ok("shard", loaded.path, "--shards", "2", "-o", tmp_path / "s")
    assert "PASS" in ok("verify", loaded.path, tmp_path / "s", "--exact").stdout


# --------------------------------------------------------------------- paddle2onnx style


def test_negative_and_unnamed_dims_are_symbolic(tmp_path: Path) -> None:
    path = _save(models.paddle_style(), tmp_path / "rec.onnx")
    specs, notes = resolve_input_shapes(load_model(path))
    assert specs[0].shape == (1, 3, 1, 1) and len(notes) == 3
    given, _ = resolve_input_shapes(load_model(path), {"x": (1, 3, 48, 192)})
    assert given[0].shape == (1, 3, 48, 192)
    ok("shard", path, "--shards", "2", "--input-shape", "x=1x3x48x192", "-o", tmp_path / "s")
    assert "PASS" in ok("verify", path, tmp_path / "s", "--exact").stdout
    _one_line_error(cli("shard", path, "-k", "2", "--input-shape", "x=2x3x48", "-o", tmp_path),
                    "rank 4")


def test_unnamed_dims_of_two_inputs_are_not_one_dimension() -> None:
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["?", 4])
    b = helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [-1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Concat", ["a", "b"], ["y"], axis=0)], "g",
                              [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    specs, _ = resolve_input_shapes(model, {"a": (3, 4), "b": (5, 4)})
    assert [s.shape for s in specs] == [(3, 4), (5, 4)]


def test_constant_held_weights_quantize(tmp_path: Path) -> None:
    path = _save(models.paddle_style(), tmp_path / "paddle.onnx")
    before = survey(onnx.load(str(path)))
    assert len(before.constant_weights) == 2 and not before.float_weights
    out = tmp_path / "q.onnx"
    result = ok("quantize", path, "--method", "dynamic", "-o", out)
    assert "lifted to initializers" in " ".join(result.stdout.split())
    quantized = survey(onnx.load(str(out)))
    assert sum(quantized.quantized.values()) == 2, quantized
    assert not quantized.float_weights and not quantized.constant_weights
    report = ok("evaluate", path, out, "--data", "random", "--json").stdout
    import json

    outputs = json.loads(report)["outputs"]
    assert outputs[0]["cosine"] > 0.99, outputs


# --------------------------------------------------------------------- already quantized


def test_already_quantized_is_said_and_nothing_written(tmp_path: Path) -> None:
    path = _save(models.paddle_style(), tmp_path / "m.onnx")
    first = tmp_path / "q.onnx"
    ok("quantize", path, "--method", "dynamic", "-o", first)
    again = tmp_path / "qq.onnx"
    _one_line_error(cli("quantize", first, "--method", "dynamic", "-o", again),
                    "already quantized", "ConvInteger", "MatMulInteger", "nothing to do")
    assert not again.exists()


def test_partly_quantized_quantizes_what_is_left(tmp_path: Path) -> None:
    path = _save(models.paddle_style(), tmp_path / "m.onnx")
    half = tmp_path / "half.onnx"
    ok("quantize", path, "--method", "dynamic", "-o", half)
    model = onnx.load(str(half))  # add a float MatMul after the quantized ones
    w = onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32), "extra_w")
    model.graph.initializer.append(w)
    old_out = model.graph.output[0].name
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == old_out:
                node.output[i] = "pre_extra"
    model.graph.node.append(helper.make_node("MatMul", ["pre_extra", "extra_w"], [old_out],
                                             name="extra"))
    mixed = _save(model, tmp_path / "mixed.onnx")
    assert survey(model).float_weights == ("extra",)
    out = tmp_path / "mixed-q.onnx"
    said = " ".join(ok("quantize", mixed, "--method", "dynamic", "-o", out).stdout.split())
    assert "already partly quantized" in said and "1 float" in said
    assert not survey(onnx.load(str(out))).float_weights


# --------------------------------------------------------------------- control flow on inputs


def _vad_feeds(path: Path, sr: int = 16000) -> Path:
    x = np.sin(np.linspace(0, 200, 1600, dtype=np.float32)).astype(np.float32)
    np.savez(path, x=x, sr=np.array(sr, dtype=np.int64))
    return path


def test_if_on_an_input_value_types_from_given_inputs(tmp_path: Path) -> None:
    path = _save(models.if_on_sample_rate(), tmp_path / "vad.onnx")
    feeds = _vad_feeds(tmp_path / "feeds.npz")
    _one_line_error(cli("shard", path, "--shards", "2", "-o", tmp_path / "no"),
                    "fails on random inputs", "--inputs FEEDS.npz")
    assert "frames" in ok("analyze", path, "--inputs", feeds, "--json").stdout
    ok("plan", path, "--shards", "2", "--inputs", feeds, "-o", tmp_path / "plan.json")
    ok("shard", path, "--shards", "2", "--inputs", feeds, "-o", tmp_path / "s")
    assert "PASS" in ok("verify", path, tmp_path / "s", "--exact", "--inputs", feeds).stdout
    q = tmp_path / "q.onnx"
    ok("quantize", path, "--method", "dynamic", "--inputs", feeds, "-o", q)
    ok("quantize", path, "--method", "static", "--inputs", feeds, "-o", tmp_path / "qs.onnx")
    assert "cosine" in ok("evaluate", path, q, "--data", feeds).stdout


# --------------------------------------------------------------------- one .npz everywhere


def test_npz_file_source_counts_samples_on_a_leading_axis(tmp_path: Path) -> None:
    require_shared()
    specs, _ = resolve_input_shapes(load_model(MODELS / "mnist-8.onnx"))
    np.savez(tmp_path / "one.npz", Input3=np.zeros((1, 1, 28, 28), np.float32))
    np.savez(tmp_path / "five.npz", Input3=np.zeros((5, 1, 28, 28), np.float32))
    np.savez(tmp_path / "stacked.npz", Input3=np.zeros((3, 1, 1, 28, 28), np.float32),
             labels=np.arange(3))
    assert len(open_source(f"npz:{tmp_path / 'one.npz'}", specs)) == 1
    assert len(open_source(str(tmp_path / "five.npz"), specs)) == 5
    stacked = open_source(f"npz:{tmp_path / 'stacked.npz'}", specs)
    assert len(stacked) == 3 and list(stacked.labels()) == [0, 1, 2]  # type: ignore[arg-type]
    assert next(stacked.batches(2))["Input3"].shape == (2, 1, 28, 28)


# --------------------------------------------------------------------- GenAI folders


def test_genai_folder_shards_and_verifies_prefill_and_decode(tmp_path: Path) -> None:
    require_shared()
    loaded = load_model(SMOLLM)
    assert loaded.path == SMOLLM / "model.onnx"
    assert loaded.name == "smollm2-135m-instruct-int4/model.onnx"
    assert loaded.declared.dims == {"past_sequence_length": 0, "kv_cache_dim": 64}
    specs, _ = resolve_input_shapes(loaded, {"past_sequence_length": (6,)})
    shapes = {s.name: s.shape for s in specs}
    assert shapes["past_key_values.29.value"] == (1, 3, 6, 64)
    assert shapes["attention_mask"] == (1, 7)  # past + the one new token
    ok("shard", SMOLLM, "--shards", "4", "-o", tmp_path / "s")
    prefill = ok("verify", SMOLLM, tmp_path / "s", "--exact", "--input-shape", "sequence_length=5")
    assert "PASS" in prefill.stdout
    decode = ok("verify", SMOLLM / "model.onnx", tmp_path / "s", "--exact",
                "--input-shape", "past_sequence_length=6")
    assert "PASS" in decode.stdout
    _one_line_error(cli("verify", SMOLLM, tmp_path / "s", "--input-shape", "past_len=3"),
                    "'past_len' is not an input", "nor one of its symbolic dimensions")


def test_folder_with_several_models_says_which_to_pass(tmp_path: Path) -> None:
    for name in ("encoder.onnx", "decoder.onnx"):
        _save(models.mlp(), tmp_path / name)
    _one_line_error(cli("analyze", tmp_path), "several .onnx models", "decoder.onnx")


# --------------------------------------------------------------------- older and non-NN exports


def test_initializers_listed_as_inputs_stay_so_in_the_shards(tmp_path: Path) -> None:
    path = _save(models.initializers_as_inputs(), tmp_path / "ir4.onnx")
    ok("shard", path, "--shards", "3", "-o", tmp_path / "s")
    for stage in sorted((tmp_path / "s").glob("stage-*.onnx")):
        shard = onnx.load(str(stage))
        listed = {i.name for i in shard.graph.input}
        assert {i.name for i in shard.graph.initializer} <= listed, stage.name
    assert "PASS" in ok("verify", path, tmp_path / "s", "--exact").stdout


def test_classifier_with_map_outputs_shards_and_has_nothing_to_quantize(tmp_path: Path) -> None:
    path = _save(models.classifier_with_zipmap(), tmp_path / "clf.onnx")
    ok("shard", path, "--shards", "2", "-o", tmp_path / "s")
    assert "PASS" in ok("verify", path, tmp_path / "s", "--exact").stdout
    _one_line_error(cli("quantize", path, "--method", "dynamic", "-o", tmp_path / "q.onnx"),
                    "nothing to quantize", "use it as it is")
    assert not (tmp_path / "q.onnx").exists()


def test_a_plan_file_named_onnx_is_said_to_be_json(tmp_path: Path) -> None:
    plan = tmp_path / "plan.onnx"
    plan.write_text('{"version": 1, "stages": []}')
    _one_line_error(cli("analyze", plan), "is JSON, not an ONNX model", "plan file")


def test_a_method_that_quantizes_nothing_says_so_and_writes_nothing(tmp_path: Path) -> None:
    """RTN takes MatMul weights only: on mnist-8 (Conv, and a MatMul whose weight is computed
    by a Reshape in opset 8) it changes nothing, and says so instead of writing a copy."""
    require_shared()
    out = tmp_path / "rtn.onnx"
    _one_line_error(cli("quantize", MODELS / "mnist-8.onnx", "--method", "rtn", "-o", out),
                    "rtn quantized nothing", "MatMul weights only", "--method dynamic")
    assert not out.exists()
