"""Headless parts of the app: the graph layout, cut moving, history, recent files, options."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from periphery_app import recent
from periphery_app.graph_layout import BOX, ROWS_PER_LAYER, fold_group, layout_graph, neighbour
from periphery_app.history import Sample, append, sample
from periphery_app.main import parse_args
from periphery_app.sample import END, sample_history, sample_state
from periphery_app.screens.graph import drawn_inside
from periphery_app.screens.shards import moved
from periphery_core.model import load_model
from periphery_core.model.analysis import NodeInfo, analyze
from periphery_core.model.graph import shape_only
from periphery_core.partition.planner import make_plan
from tests.conftest import MODELS, require_shared

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo-resnet.onnx"


@pytest.fixture(scope="module")
def demo_analysis():
    return analyze(load_model(DEMO))


def _node(i: int, key: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> NodeInfo:
    return NodeInfo(index=i, key=key, name=key, op_type="Op", domain="", inputs=inputs,
                    outputs=outputs, flops=0, param_bytes=0, output_bytes=0, has_subgraph=False)


@pytest.mark.parametrize(("name", "group"), [
    ("block3.conv1", "block3"),
    ("/layers.0/attention_norm/Cast", "/layers.0"),
    ("/m/encoder/layer.11/attention/self/MatMul", "/m/encoder/layer.11"),
    ("stem.relu", None),
    ("Constant_227", None),
    ("/Constant_1", None),
])
def test_fold_group_finds_numbered_prefixes(name: str, group: str | None) -> None:
    assert fold_group(name) == group


def test_layout_places_every_node_in_a_layer_below_its_inputs(demo_analysis) -> None:
    layout = layout_graph(demo_analysis.nodes)
    assert len(layout.vertices) == len(demo_analysis.nodes)
    for a, b in layout.edges:
        assert layout.vertices[a].layer < layout.vertices[b].layer
    # a residual block: stem.relu feeds both block0.conv1 and block0.add, so its wires fork
    row = layout.row_of(1) + 1
    assert any(BOX[bits] in "┬┼├┤" for bits, _ in layout.edge_cells[row].values())
    # boxes in one layer never overlap
    for ids in layout.layers:
        spans = sorted((layout.vertices[v].x, layout.vertices[v].width) for v in ids)
        for (x0, w0), (x1, _) in itertools.pairwise(spans):
            assert x0 + w0 <= x1
    assert layout.height == (len(layout.layers) - 1) * ROWS_PER_LAYER + 1


def test_folding_collapses_numbered_blocks(demo_analysis) -> None:
    folded = layout_graph(demo_analysis.nodes, fold=True)
    labels = [v.label for v in folded.vertices]
    assert any(label.startswith("▸ block3 ×") for label in labels)
    assert len(folded.vertices) < len(demo_analysis.nodes) // 2
    assert sum(len(v.members) for v in folded.vertices) == len(demo_analysis.nodes)


def test_a_fold_that_would_make_a_cycle_is_left_unfolded() -> None:
    # g.1 -> outside -> g.2: folding g would make g -> outside -> g
    nodes = [_node(0, "g1.a", ("x",), ("t1",)), _node(1, "mid", ("t1",), ("t2",)),
             _node(2, "g1.b", ("t2",), ("y",))]
    layout = layout_graph(nodes, fold=True)
    assert len(layout.vertices) == 3
    assert layout.notes


def test_a_fold_keeps_the_plumbing_its_group_reads() -> None:
    # Shape_1 reads g1.a and feeds g1.b: drawn inside g1.b, it must not make g1 look non-convex
    nodes = [_node(0, "g1.a", ("x",), ("t",)), _node(1, "Shape_1", ("t",), ("s",)),
             _node(2, "g1.b", ("t", "s"), ("y",))]
    layout = layout_graph(nodes, fold=True, absorb=frozenset({1}))
    assert [v.members for v in layout.vertices] == [(0, 2, 1)]
    assert layout.vertices[0].own == (0, 2) and not layout.notes


def _op(i: int, op: str, inputs: tuple[str, ...], output: str) -> NodeInfo:
    """A node with no name to fold by (its key is made from its op, as for a nameless one)."""
    return NodeInfo(index=i, key=f"{op}_{i}", name="", op_type=op, domain="", inputs=inputs,
                    outputs=(output,), flops=0, param_bytes=0, output_bytes=0,
                    has_subgraph=False)


def test_folding_finds_repeated_blocks_by_structure_where_names_say_nothing() -> None:
    nodes, x = [], "x"
    for b in range(4):  # residual blocks: the skip crosses the whole block, so none is split
        base = len(nodes)
        nodes += [_op(base, "Conv", (x, "w"), f"c{b}"), _op(base + 1, "Relu", (f"c{b}",), f"r{b}"),
                  _op(base + 2, "Conv", (f"r{b}", "w"), f"d{b}"),
                  _op(base + 3, "Add", (f"d{b}", x), f"y{b}")]
        x = f"y{b}"
    nodes.append(_op(len(nodes), "Gemm", (x, "w"), "logits"))
    assert len(layout_graph(nodes).vertices) == 17
    folded = layout_graph(nodes, fold=True, inputs=frozenset({"x"}))
    assert [v.label for v in folded.vertices] == [
        f"▸ {b}/4 Conv…Add ×4" for b in range(1, 5)] + ["Gemm"]
    assert [v.members for v in folded.vertices[:4]] == [
        tuple(range(4 * b, 4 * b + 4)) for b in range(4)]
    assert [v.layer for v in folded.vertices] == list(range(5))
    assert not folded.notes


def test_a_block_that_would_hold_most_of_the_model_is_left_unfolded() -> None:
    # A skip from the first node's output to the last node's input: no cut inside, one segment.
    chain = [_op(0, "Conv", ("x", "w"), "a")]
    for i in range(1, 6):
        chain.append(_op(i, "Relu" if i % 2 else "Conv", (chain[-1].outputs[0],), f"t{i}"))
    chain.append(_op(6, "Concat", ("a", "t5"), "y"))
    assert len(layout_graph(chain, fold=True, inputs=frozenset({"x"})).vertices) == len(chain)


def test_a_model_exported_without_names_folds_into_its_blocks() -> None:
    require_shared()
    loaded = load_model(MODELS / "light_shufflenet_randw.onnx")
    analysis = analyze(loaded)
    assert not any(fold_group(n.key) for n in analysis.nodes)  # names fold nothing here
    layout = layout_graph(analysis.nodes, fold=True,
                          inputs=frozenset(s.name for s in analysis.inputs))
    assert len(layout.vertices) < len(analysis.nodes) // 5
    assert sorted(i for v in layout.vertices for i in v.members) == list(range(len(analysis.nodes)))
    assert any("/" in v.label for v in layout.vertices)  # a run of repeated blocks
    assert not layout.notes


def _shape_arithmetic_model(path: Path) -> Path:
    """An embedding lookup, then a Reshape whose target is computed from the activation's shape
    (as torch.onnx exports `x.view(x.size(0), -1)`), and the result's shape as a second output."""
    inits: dict[str, np.ndarray] = {"emb": np.arange(60, dtype=np.float32).reshape(10, 6),
            "zero": np.array(0, dtype=np.int64), "axes": np.array([0], dtype=np.int64),
            "rest": np.array([-1], dtype=np.int64)}
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
         helper.make_node("Add", ["x", "e"], ["h"], name="add"),
         helper.make_node("Shape", ["h"], ["s"], name="shape"),
         helper.make_node("Gather", ["s", "zero"], ["n"], name="first", axis=0),
         helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
         helper.make_node("Concat", ["n1", "rest"], ["target"], name="concat", axis=0),
         helper.make_node("Reshape", ["h", "target"], ["y"], name="reshape"),
         helper.make_node("Shape", ["y"], ["y_shape"], name="out_shape")],
        "shapes",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 6]),
         helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("y_shape", onnx.TensorProto.INT64, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_shape_arithmetic_is_drawn_inside_the_node_it_feeds(tmp_path: Path) -> None:
    loaded = load_model(_shape_arithmetic_model(tmp_path / "shapes.onnx"))
    analysis = analyze(loaded)
    keys = shape_only(loaded.proto.graph, [n.key for n in analysis.nodes],
                      analysis.constant_nodes)
    # the embedding reads the ids' values; the last Shape is a model output
    assert keys == {"shape", "first", "unsqueeze", "concat"}
    layout = layout_graph(analysis.nodes, absorb=drawn_inside(analysis, keys))
    assert [v.label for v in layout.vertices] == ["Gather embed", "Add add", "Reshape reshape",
                                                  "Shape out_shape"]
    reshape = layout.vertices[2]
    assert reshape.absorbed == 4 and not reshape.folded
    assert {layout.vertex_of_node[i] for i in range(2, 7)} == {reshape.id}
    assert layout.edges == [(0, 1), (1, 2), (2, 3)]


def test_arrow_navigation_moves_between_layers_and_within_one(demo_analysis) -> None:
    layout = layout_graph(demo_analysis.nodes)
    first = layout.layers[0][0]
    below = neighbour(layout, first, "down")
    assert layout.vertices[below].layer > layout.vertices[first].layer
    assert neighbour(layout, below, "up") == first
    assert neighbour(layout, first, "up") == first  # nowhere to go


def test_moving_a_cut_stays_between_its_neighbours(demo_analysis) -> None:
    plan = make_plan(demo_analysis, 3)
    cuts = plan.cuts
    n = len(demo_analysis.nodes)
    assert moved(cuts, 0, 1, n) == [cuts[0] + 1, cuts[1]]
    assert moved(cuts, 0, 1000, n) == [cuts[1] - 1, cuts[1]]
    assert moved(cuts, 1, 1000, n) == [cuts[0], n - 1]
    assert moved(cuts, 0, -1000, n) == [1, cuts[1]]


def test_history_samples_the_fold_and_is_capped() -> None:
    state = sample_state()
    s = sample(state, END)
    assert 0.02 < s.p50_s <= s.p99_s < 0.2
    assert s.throughput == pytest.approx(20.0, rel=0.05)
    history = sample_history()
    assert all(not math.isnan(x.p50_s) for x in history[1:])
    capped: tuple[Sample, ...] = ()
    for _ in range(500):
        capped = append(capped, s)
    assert len(capped) == 120


def test_recent_files_live_in_the_config_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PERIPHERY_CONFIG_DIR", str(tmp_path / "cfg"))
    assert recent.load_recent() == []
    recent.remember(DEMO)
    recent.remember(DEMO)
    assert recent.load_recent() == [DEMO.resolve()]
    (tmp_path / "cfg" / "recent.json").write_text("{broken")
    assert recent.load_recent() == []


def test_recent_models_of_the_same_name_show_the_folders_that_tell_them_apart() -> None:
    paths = [Path("/w/main/assets/demo.onnx"), Path("/w/copy/assets/demo.onnx"),
             Path("/w/main/m.onnx"), Path("/a/smollm/model.onnx"), Path("/b/smollm/model.onnx"),
             Path("/x/demo.onnx")]
    assert recent.distinct_names(paths) == [
        "demo.onnx (main/assets)", "demo.onnx (copy/assets)", "m.onnx",
        "smollm/model.onnx (a/smollm)", "smollm/model.onnx (b/smollm)", "demo.onnx (/x)"]


def test_command_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--demo" in out and "MODEL" in out.upper()
    args = parse_args(["m.onnx", "--demo", "--nodes", "2"])
    assert args.demo and args.nodes == 2 and args.model == Path("m.onnx")


def test_the_app_starts_its_local_nodes_on_the_device_asked_for() -> None:
    """`periphery-app --demo --device cuda:0`: the local nodes it starts run `--device
    cuda:0` (where no GPU is usable they fall back to the CPU and the Shards screen's stage
    chart says CPU); a device that is not one is refused before anything starts."""
    from periphery_app.control import ClusterControl

    assert parse_args(["--demo", "--device", "cuda:0"]).device == "cuda:0"
    assert parse_args([]).device == "cpu"
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "tpu"])
    assert exc.value.code == 2
    control = ClusterControl(insecure=False, device="cuda:0")
    try:
        (handle,) = control.start_local(1)
        assert handle.device.startswith("cuda:0 (")
    finally:
        control.close()
