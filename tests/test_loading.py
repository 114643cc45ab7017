"""Library level: external data, input shapes, plan and devices files, and graph features that
shards must carry (outer-scope reads, model-local functions, early outputs and late inputs)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from periphery_core.errors import DevicesError, InputShapeError, ModelLoadError, PlanError
from periphery_core.model import load_model, loading
from periphery_core.model.analysis import ModelAnalysis, analyze
from periphery_core.model.loading import LoadedModel
from periphery_core.model.shapes import parse_input_shape, resolve_input_shapes
from periphery_core.partition.extract import extract_shards, iter_shards, write_shards
from periphery_core.partition.plan import DeviceSpec, ShardPlan, load_devices, load_plan
from periphery_core.partition.planner import make_plan
from periphery_core.partition.verify import verify_chain
from periphery_core.runtime.feeds import random_feeds
from tests import models
from tests.conftest import MODELS, require_shared


def _load(model: onnx.ModelProto, tmp_path: Path, name: str = "model.onnx") -> LoadedModel:
    path = tmp_path / name
    onnx.save(model, str(path))
    return load_model(path)


def _split(
    loaded: LoadedModel, k: int, shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[ModelAnalysis, ShardPlan, list[onnx.ModelProto]]:
    analysis = analyze(loaded, shapes)
    plan = make_plan(analysis, k)
    return analysis, plan, extract_shards(loaded, analysis, plan)


def _assert_exact(model: onnx.ModelProto | Path, shards: Sequence, feeds: dict) -> None:
    report = verify_chain(model, shards, feeds, exact=True)
    assert report.outputs, "nothing was compared"
    bad = [o.name for o in report.outputs if not o.bit_identical]
    assert report.passed and not bad, f"outputs differ: {bad}"


# --------------------------------------------------------------------------- external data


def test_external_data_model_splits_exactly(tmp_path: Path) -> None:
    path = models.save_with_external_data(models.mlp(), tmp_path / "mlp.onnx")
    assert (tmp_path / "w.data").stat().st_size > 0
    loaded = load_model(path)
    assert loaded.has_external_data
    # The weights are in memory now, not pointers into w.data.
    assert all(i.data_location == onnx.TensorProto.DEFAULT for i in loaded.proto.graph.initializer)
    analysis, plan, shards = _split(loaded, 2)
    assert analysis.total_param_bytes == 3 * 32 * 32 * 4
    assert analysis.total_flops > 0
    assert plan.k == 2
    paths = write_shards(shards, plan, tmp_path / "shards")
    # Small shards are self-contained: nothing points back at w.data.
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "plan.json", "stage-0.onnx", "stage-1.onnx"]
    feeds = random_feeds(analysis.inputs, seed=1)
    _assert_exact(path, paths, feeds)
    _assert_exact(loaded.proto, shards, feeds)


@pytest.fixture
def small_external_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real model over 2 GB is too heavy for CI: lower the threshold so that a 12 KiB model
    # takes the same path (weights written beside each shard as `<stage>.onnx.data`).
    monkeypatch.setattr(loading, "EXTERNAL_DATA_THRESHOLD", 1000)


@pytest.mark.usefixtures("small_external_threshold")
def test_big_shards_are_written_with_external_data(tmp_path: Path) -> None:
    loaded = _load(models.mlp(), tmp_path)
    analysis, plan, shards = _split(loaded, 2)
    out = tmp_path / "shards"
    paths = write_shards(shards, plan, out)
    for p in paths:
        data = p.with_name(p.name + ".data")
        assert data.is_file() and data.stat().st_size >= 32 * 32 * 4, data
        on_disk = onnx.load(str(p), load_external_data=False)
        assert on_disk.graph.initializer
        assert all(i.data_location == onnx.TensorProto.EXTERNAL
                   for i in on_disk.graph.initializer)
    _assert_exact(loaded.proto, paths, random_feeds(analysis.inputs, seed=2))


@pytest.mark.usefixtures("small_external_threshold")
def test_writing_big_shards_leaves_them_usable_in_memory(tmp_path: Path) -> None:
    # write_shards must not empty the protos it is given: the app keeps the shards it wrote.
    loaded = _load(models.mlp(), tmp_path)
    analysis, plan, shards = _split(loaded, 2)
    before = [s.SerializeToString() for s in shards]
    write_shards(shards, plan, tmp_path / "shards")
    emptied = [i.name for s in shards for i in s.graph.initializer
               if i.data_location == onnx.TensorProto.EXTERNAL]
    assert not emptied, f"write_shards moved {emptied} out of the caller's protos"
    assert [s.SerializeToString() for s in shards] == before, "write_shards changed the shards"
    _assert_exact(loaded.proto, shards, random_feeds(analysis.inputs))


@pytest.mark.usefixtures("small_external_threshold")
def test_rewriting_big_shards_does_not_grow_their_data_files(tmp_path: Path) -> None:
    loaded = _load(models.mlp(), tmp_path)
    analysis, plan, _ = _split(loaded, 2)
    out = tmp_path / "shards"
    paths = write_shards(extract_shards(loaded, analysis, plan), plan, out)
    sizes = {p.name: p.with_name(p.name + ".data").stat().st_size for p in paths}
    paths = write_shards(extract_shards(loaded, analysis, plan), plan, out)
    again = {p.name: p.with_name(p.name + ".data").stat().st_size for p in paths}
    assert again == sizes, "a second write appended to the old .data files"
    _assert_exact(loaded.proto, paths, random_feeds(analysis.inputs))


def _mixed_weights() -> onnx.ModelProto:
    """x[1, 64] -> MatMul w0 -> Relu -> Add b0 -> MatMul w1 -> MatMul w2 -> y[1, 8].

    w0 and w1 (16 KiB) are weights `load_model(weights="small")` leaves on disk, w2 (2 KiB) one
    it reads and onnx still moves to a data file, b0 (256 B) one onnx keeps inline.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32), name)
             for name, shape in (("w0", (64, 64)), ("b0", (64,)), ("w1", (64, 64)),
                                 ("w2", (64, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "b0"], ["b"], name="add"),
             helper.make_node("MatMul", ["b", "w1"], ["c"], name="mm1"),
             helper.make_node("MatMul", ["c", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "mixed", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])


@pytest.fixture
def small_release_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # Shards of a few KiB take the path of shards of GiB: weights go to their own data files.
    monkeypatch.setattr(loading, "RELEASE_THRESHOLD", 1000)


def _data(path: Path) -> Path:
    return path.with_name(path.name + ".data")


@pytest.mark.usefixtures("small_release_threshold")
def test_shards_copy_their_own_weights_from_a_model_left_on_disk(tmp_path: Path) -> None:
    path = models.save_with_external_data(_mixed_weights(), tmp_path / "model.onnx")
    light = load_model(path, weights="small")
    on_disk = {i.name for i in light.proto.graph.initializer
               if i.data_location == onnx.TensorProto.EXTERNAL}
    assert on_disk == {"w0", "w1"}, "the big weights were read into memory"
    analysis = analyze(light)
    plan = make_plan(analysis, 2)  # mm0 relu add | mm1 mm2: w1 copied from disk, then w2
    paths = write_shards(iter_shards(light, analysis, plan), plan, tmp_path / "shards",
                         keep=False, weights_dir=tmp_path)
    # Byte for byte the files onnx writes for the shards of the model loaded whole.
    full = load_model(path)
    (tmp_path / "onnx").mkdir()
    for p, shard in zip(paths, extract_shards(full, analyze(full), plan), strict=True):
        ref = tmp_path / "onnx" / p.name
        onnx.save_model(shard, str(ref), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=_data(ref).name,
                        size_threshold=1024)
        assert p.read_bytes() == ref.read_bytes(), p.name
        assert _data(p).is_file() == _data(ref).is_file(), p.name
        if _data(ref).is_file():
            assert _data(p).read_bytes() == _data(ref).read_bytes(), p.name
    # Each shard's data file holds its own weights and nothing else.
    weights = {i.name: numpy_helper.to_array(i) for i in full.proto.graph.initializer}
    for p in paths:
        onnx.checker.check_model(str(p), full_check=True)
        shard = onnx.load(str(p))
        read = {n for node in shard.graph.node for n in node.input if n in weights}
        assert {i.name for i in shard.graph.initializer} == read
        for init in shard.graph.initializer:
            np.testing.assert_array_equal(numpy_helper.to_array(init), weights[init.name])
        external = [i.name for i in onnx.load(str(p), load_external_data=False).graph.initializer
                    if i.data_location == onnx.TensorProto.EXTERNAL]
        size = _data(p).stat().st_size if _data(p).is_file() else 0
        assert size == sum(weights[n].nbytes for n in external), p.name
    _assert_exact(path, paths, random_feeds(analysis.inputs, seed=3))


@pytest.mark.usefixtures("small_release_threshold")
def test_a_data_file_cut_short_is_a_load_error_when_shards_copy_from_it(
        tmp_path: Path) -> None:
    path = models.save_with_external_data(_mixed_weights(), tmp_path / "model.onnx")
    light = load_model(path, weights="small")
    analysis = analyze(light)
    plan = make_plan(analysis, 2)
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:-3000])  # into w1 (w2's 2 KiB are read already)
    with pytest.raises(ModelLoadError, match=r"w1.*past the end"):
        write_shards(iter_shards(light, analysis, plan), plan, tmp_path / "shards", keep=False,
                     weights_dir=tmp_path)


# --------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize(
    ("spec", "name", "shape"),
    [
        ("x=", "x", ()),
        ("a=1x3x224x224", "a", (1, 3, 224, 224)),
        ("a=1,3", "a", (1, 3)),
        ("a=7", "a", (7,)),
        ("a=0x4", "a", (0, 4)),
        ("a=1x 3", "a", (1, 3)),
        ("key=value=2x3", "key=value", (2, 3)),
        ("encoder/input_ids:0=1x128", "encoder/input_ids:0", (1, 128)),
        ("past_key_values.0.key=1x4x0x8", "past_key_values.0.key", (1, 4, 0, 8)),
    ],
)
def test_parse_input_shape(spec: str, name: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(spec) == (name, shape)


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        ("images", "NAME=DIMS"),
        ("=1x3", "NAME=DIMS"),
        ("a=1xax3", "integers"),
        ("a=1x", "integers"),
        ("a=1xx3", "integers"),
        ("a=1.5x3", "integers"),
        ("a=-1x3", "negative"),
    ],
)
def test_parse_input_shape_rejects(spec: str, word: str) -> None:
    with pytest.raises(InputShapeError) as info:
        parse_input_shape(spec)
    assert word in info.value.message
    assert "\n" not in info.value.message


def _resolved(given: dict | None = None) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    specs, notes = resolve_input_shapes(models.symbolic_inputs(), given)
    return {s.name: s.shape for s in specs}, notes


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # Nothing given: batch-like and symbolic dims 1, cache lengths ("past") 0.
        (None, {"tokens": (1, 1), "past": (1, 4, 0, 8), "mask": (1, 1), "free": (1, 3)}),
        # A symbol given once holds for every input that names it.
        ({"tokens": (2, 5)},
         {"tokens": (2, 5), "past": (2, 4, 0, 8), "mask": (2, 1), "free": (1, 3)}),
        ({"past": (3, 4, 6, 8)},
         {"tokens": (3, 1), "past": (3, 4, 6, 8), "mask": (3, 1), "free": (1, 3)}),
        ({"mask": (2, 9), "free": (5, 3)},
         {"tokens": (2, 1), "past": (2, 4, 0, 8), "mask": (2, 9), "free": (5, 3)}),
    ],
)
def test_resolve_input_shapes(given: dict | None, expected: dict) -> None:
    shapes, _ = _resolved(given)
    assert shapes == expected


def test_resolve_input_shapes_notes_say_what_was_assumed() -> None:
    _, notes = _resolved()
    by_symbol = {n.split("'")[1]: n for n in notes}
    assert set(by_symbol) == {"batch", "seq", "past_len", "total", "free:0"}
    assert by_symbol["batch"].startswith("batch-like") and "to 1" in by_symbol["batch"]
    assert "to 0" in by_symbol["past_len"]
    assert "--input-shape tokens=" in by_symbol["seq"]
    _, notes = _resolved({"tokens": (2, 5)})
    assert not any("'batch'" in n or "'seq'" in n for n in notes)


def test_resolve_input_shapes_batch_like_names() -> None:
    for symbol in ("N", "batch_size", "unk__42"):
        _, notes = resolve_input_shapes(models.mlp(batch=symbol))
        assert notes == [f"batch-like dimension '{symbol}' defaulted to 1; set it with "
                         "--input-shape x=..."]


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"past": (1, 3, 0, 8)}, ["dimension 1", "fixed at 4"]),  # contradicts a fixed dim
        ({"tokens": (1, 2, 3)}, ["rank 2", "rank 3"]),
        ({"past": ()}, ["rank 4", "scalar"]),
        ({"nope": (1,)}, ["'nope' is not an input", "tokens, past, mask, free"]),
    ],
)
def test_resolve_input_shapes_rejects(given: dict, words: list[str]) -> None:
    with pytest.raises(InputShapeError) as info:
        _resolved(given)
    for word in words:
        assert word in info.value.message


# --------------------------------------------------------------------------- plan files


TWO_DEVICES = (
    DeviceSpec("edge", speed=1.0, memory_bytes=8 * 2**30, bandwidth=125e6),
    DeviceSpec("box", speed=2.5, memory_bytes=None, bandwidth=1.25e9),
)


@pytest.fixture
def mlp_plan(tmp_path: Path) -> ShardPlan:
    loaded = _load(models.mlp(batch="batch"), tmp_path)
    analysis = analyze(loaded, {"x": (4, 32)})
    return make_plan(analysis, 2, devices=TWO_DEVICES)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_plan_file_round_trip(mlp_plan: ShardPlan, tmp_path: Path, suffix: str) -> None:
    assert mlp_plan.input_shapes == {"x": (4, 32)}
    assert mlp_plan.devices == TWO_DEVICES
    assert mlp_plan.k == 2 and all(s.inputs and s.outputs for s in mlp_plan.stages)
    path = mlp_plan.save(tmp_path / f"plan{suffix}")
    assert load_plan(path) == mlp_plan


def test_plan_file_round_trip_keeps_notes(tmp_path: Path) -> None:
    loaded = _load(models.mlp(batch="batch"), tmp_path)
    plan = make_plan(analyze(loaded), 3)
    assert plan.notes and "batch" in plan.notes[0]
    for suffix in (".json", ".toml"):
        assert load_plan(plan.save(tmp_path / f"p{suffix}")) == plan


def test_plan_file_of_another_version_is_refused(mlp_plan: ShardPlan, tmp_path: Path) -> None:
    path = mlp_plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert "version 2" in info.value.message and "version 1" in info.value.message


def test_damaged_plan_file_is_a_plan_error(mlp_plan: ShardPlan, tmp_path: Path) -> None:
    path = mlp_plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    del data["stages"][0]["nodes"]
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="damaged"):
        load_plan(path)


def test_load_devices_units(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(
        '[[device]]\nname = "pi"\nmemory = "8GiB"\nbandwidth = "1Gbit/s"\n\n'
        '[[device]]\nname = "box"\nspeed = "2.5x"\nmemory = "512MB"\nbandwidth = "100Mbit/s"\n\n'
        '[[device]]\nspeed = 4\nmemory = 1000000\nbandwidth = 125e6\n\n'
        '[[device]]\nname = "nas"\nmemory = "1.5 KiB"\nbandwidth = "2GiB/s"\n'
    )
    assert load_devices(path) == (
        DeviceSpec("pi", 1.0, 8 * 2**30, 125e6),
        DeviceSpec("box", 2.5, 512_000_000, 12.5e6),
        DeviceSpec("device2", 4.0, 1_000_000, 125e6),
        DeviceSpec("nas", 1.0, 1536, 2 * 2**30),
    )
    as_json = tmp_path / "devices.json"
    as_json.write_text(json.dumps({"devices": [{"name": "a", "memory": "1GB",
                                                "bandwidth": "10Gbps"}]}))
    assert load_devices(as_json) == (DeviceSpec("a", 1.0, 10**9, 1.25e9),)


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ('[[device]]\nbandwidth = "fast"\n', "bandwidth"),
        ('[[device]]\nmemory = "8 parsecs"\n', "memory"),
        ("[[device]]\nspeed = 0\n", "positive"),
        ('[[device]]\ncolour = "red"\n', "unknown key"),
        ('name = "solo"\n', "no devices"),
    ],
)
def test_load_devices_rejects(tmp_path: Path, body: str, word: str) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(body)
    with pytest.raises(DevicesError) as info:
        load_devices(path)
    assert word in info.value.message


# --------------------------------------------------------------------------- graph features


def test_if_node_reads_outer_scope_tensor(tmp_path: Path) -> None:
    require_shared()
    loaded = load_model(MODELS / "if-subgraph.onnx")
    analysis = analyze(loaded)
    assert len(analysis.nodes) == 5  # so K runs 2..5 below
    (if_node,) = [n for n in analysis.nodes if n.op_type == "If"]
    assert if_node.has_subgraph
    # `a` is read only inside the branches, never as an explicit input of the If.
    assert "a" not in loaded.proto.graph.node[if_node.index].input
    assert set(if_node.inputs) == {"cond", "a"}
    feeds = [{"x": np.array(1.0, np.float32), "y": np.array(2.0, np.float32)},   # then
             {"x": np.array(-3.0, np.float32), "y": np.array(1.0, np.float32)}]  # else
    for k in range(2, len(analysis.nodes) + 1):
        plan = make_plan(analysis, k)
        shards = extract_shards(loaded, analysis, plan)
        (holder,) = [s for s in shards if any(n.op_type == "If" for n in s.graph.node)]
        produced = {o for n in holder.graph.node for o in n.output}
        available = {i.name for i in holder.graph.input} | {
            i.name for i in holder.graph.initializer}
        assert "a" in available or "a" in produced, f"K={k}: the If shard cannot see 'a'"
        if k == len(analysis.nodes):
            assert "a" in {i.name for i in holder.graph.input}
        for f in feeds:
            _assert_exact(loaded.proto, shards, f)


def test_model_local_function_travels_with_its_shard(tmp_path: Path) -> None:
    loaded = _load(models.with_local_function(), tmp_path)
    analysis, _, shards = _split(loaded, 2)
    assert len(shards) == 2
    users = [s for s in shards if any(n.domain == "custom" for n in s.graph.node)]
    others = [s for s in shards if s not in users]
    assert len(users) == 1 and len(others) == 1
    assert [(f.domain, f.name) for f in users[0].functions] == [("custom", "ScaleShift")]
    assert len(others[0].functions) == 0
    assert any(o.domain == "custom" for o in users[0].opset_import)
    for s in shards:
        onnx.checker.check_model(s, full_check=True)
    _assert_exact(loaded.proto, shards, random_feeds(analysis.inputs, seed=3))


def test_early_output_and_late_input_pass_through(tmp_path: Path) -> None:
    loaded = _load(models.early_output_late_input(), tmp_path)
    analysis, plan, shards = _split(loaded, 3)
    middle = shards[1]
    assert "first" in plan.stages[0].nodes and "last" in plan.stages[2].nodes
    io = [({i.name for i in s.graph.input}, {o.name for o in s.graph.output}) for s in shards]
    for name in ("early", "z"):
        assert name in io[1][0] and name in io[1][1], f"the middle shard drops '{name}'"
        assert not any(name in n.input for n in middle.graph.node)
    assert "z" in io[0][0] and "z" in io[0][1]
    assert "early" in io[0][1] and "early" in io[2][0]
    assert {"early", "y"} <= io[2][1]
    _assert_exact(loaded.proto, shards, random_feeds(analysis.inputs, seed=4))

