"""The pure planner: its order, its cost model, and each strategy against brute force."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from periphery_core.errors import PlanError
from periphery_core.partition.cost_model import PlanningGraph, PlanNode, stages_from_cuts
from periphery_core.partition.order import choose_order
from periphery_core.partition.plan import Boundary, DeviceSpec, Stage
from periphery_core.partition.planner import plan_stages

# ---------------------------------------------------------------------------------------------
# Building graphs.


def tensor(name: str, nbytes: int) -> Boundary:
    return Boundary(name, "float32", (nbytes // 4,), nbytes)


def node(key: str, inputs: Sequence[str], outputs: Sequence[str], cost: float = 1.0,
         params: Sequence[tuple[str, int]] = (), flops: int = 10) -> PlanNode:
    return PlanNode(key=key, cost_s=cost, flops=flops, params=tuple(params),
                    inputs=tuple(inputs), outputs=tuple(outputs))


def graph_of(nodes: Sequence[PlanNode], sizes: dict[str, int], inputs: Sequence[str],
             outputs: Sequence[str]) -> PlanningGraph:
    return PlanningGraph(nodes=tuple(nodes),
                         tensors={name: tensor(name, b) for name, b in sizes.items()},
                         graph_inputs=tuple(inputs), graph_outputs=tuple(outputs))


def chain(costs: Sequence[float], nbytes: int = 8) -> PlanningGraph:
    nodes = [node(f"n{i}", [f"t{i}"], [f"t{i + 1}"], cost=c) for i, c in enumerate(costs)]
    sizes = {f"t{i}": nbytes for i in range(len(costs) + 1)}
    return graph_of(nodes, sizes, ["t0"], [f"t{len(costs)}"])


@st.composite
def graphs(draw: st.DrawFn, max_nodes: int = 12) -> PlanningGraph:
    n = draw(st.integers(1, max_nodes))
    n_inputs = draw(st.integers(1, 2))
    sizes: dict[str, int] = {}
    available: list[str] = []
    for i in range(n_inputs):
        sizes[f"in{i}"] = draw(st.integers(0, 400))
        available.append(f"in{i}")
    weights = {f"w{i}": draw(st.integers(1, 300)) for i in range(4)}
    nodes = []
    for v in range(n):
        reads = draw(st.lists(st.sampled_from(available), max_size=3, unique=True))
        outs = [f"t{v}_{o}" for o in range(draw(st.integers(1, 2)))]
        for name in outs:
            sizes[name] = draw(st.integers(0, 400))
        params = draw(st.lists(st.sampled_from(sorted(weights)), max_size=2, unique=True))
        nodes.append(node(
            f"n{v}", reads, outs,
            cost=draw(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)),
            params=[(p, weights[p]) for p in params],
            flops=draw(st.integers(0, 100)),
        ))
        available.extend(outs)
    outputs = draw(st.lists(st.sampled_from(available), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):  # the last node's output is an output, as in most models
        outputs.append(nodes[-1].outputs[0])
    return graph_of(nodes, sizes, [f"in{i}" for i in range(n_inputs)],
                    list(dict.fromkeys(outputs)))


@st.composite
def device_lists(draw: st.DrawFn, k: int, caps: bool = True) -> tuple[DeviceSpec, ...]:
    return tuple(
        DeviceSpec(
            name=f"d{i}",
            speed=draw(st.floats(0.25, 4.0)),
            memory_bytes=draw(st.one_of(st.none(), st.integers(0, 3000))) if caps else None,
            bandwidth=draw(st.floats(50.0, 5000.0)),
            workers=draw(st.integers(1, 4)),
        )
        for i in range(k)
    )


# ---------------------------------------------------------------------------------------------
# A reference evaluator written straight from the cost model, with sets and no cleverness.


def reference_stages(graph: PlanningGraph, order: Sequence[int], cuts: Sequence[int],
                     devices: Sequence[DeviceSpec]) -> list[dict[str, object]]:
    n = len(order)
    bounds = [0, *cuts, n]
    k = len(bounds) - 1
    stage_of = {}
    for s in range(k):
        for p in range(bounds[s], bounds[s + 1]):
            stage_of[order[p]] = s
    pos = {v: p for p, v in enumerate(order)}
    made_at = {name: -1 for name in graph.graph_inputs}  # position after which it exists
    rank = {name: (0, i) for i, name in enumerate(graph.graph_inputs)}
    for v, nd in enumerate(graph.nodes):
        for slot, name in enumerate(nd.outputs):
            made_at[name] = pos[v]
            rank[name] = (pos[v] + 1, slot)
    readers: dict[str, list[int]] = {name: [] for name in made_at}
    for v, nd in enumerate(graph.nodes):
        for name in nd.inputs:
            readers[name].append(v)

    def boundary_after(s: int) -> list[str]:
        end = bounds[s + 1]  # tensors made before this position exist
        names = [t for t in made_at if made_at[t] < end and (
            t in graph.graph_outputs or any(stage_of[r] > s for r in readers[t]))]
        return sorted(names, key=lambda t: rank[t])

    def live(i: int) -> int:
        resident = {t for t in made_at if made_at[t] < i and (
            t in graph.graph_outputs or any(pos[r] >= i for r in readers[t]))}
        resident |= set(graph.nodes[order[i]].outputs)
        return sum(graph.tensors[t].nbytes for t in resident)

    stage0_inputs = [t for t in graph.graph_inputs if readers[t] or t in graph.graph_outputs]
    result = []
    for s in range(k):
        members = [order[p] for p in range(bounds[s], bounds[s + 1])]
        outs = list(graph.graph_outputs) if s == k - 1 else boundary_after(s)
        params = dict(p for v in members for p in graph.nodes[v].params)
        result.append({
            "nodes": [graph.nodes[v].key for v in members],
            "inputs": stage0_inputs if s == 0 else boundary_after(s - 1),
            "outputs": outs,
            "compute_s": sum(graph.nodes[v].cost_s for v in members) / devices[s].speed,
            "transfer_s": sum(graph.tensors[t].nbytes for t in outs) / devices[s].bandwidth,
            "flops": sum(graph.nodes[v].flops for v in members),
            "param_bytes": sum(params.values()),
            "peak": max(live(p) for p in range(bounds[s], bounds[s + 1])),
        })
    return result


def bottleneck(stages: Sequence[Stage]) -> float:
    return max(s.cost_s for s in stages)


def fits(stages: Sequence[Stage], devices: Sequence[DeviceSpec]) -> bool:
    """Each stage's parameters and, for each request its device computes at once, its
    activations, within the device's cap."""
    return all(d.memory_bytes is None
               or s.param_bytes + d.workers * s.peak_activation_bytes <= d.memory_bytes
               for s, d in zip(stages, devices, strict=False))


def is_topological(graph: PlanningGraph, keys: Sequence[str]) -> bool:
    by_key = {nd.key: nd for nd in graph.nodes}
    if sorted(keys) != sorted(by_key):
        return False
    made = set(graph.graph_inputs)
    for key in keys:
        if not set(by_key[key].inputs) <= made:
            return False
        made.update(by_key[key].outputs)
    return True


def assert_consistent(graph: PlanningGraph, stages: Sequence[Stage], k: int) -> None:
    assert len(stages) == k
    assert all(s.nodes for s in stages)
    assert [s.index for s in stages] == list(range(k))
    assert is_topological(graph, [key for s in stages for key in s.nodes])
    for before, after in itertools.pairwise(stages):
        assert [b.name for b in before.outputs] == [b.name for b in after.inputs]
    assert [b.name for b in stages[-1].outputs] == list(graph.graph_outputs)


def names(boundaries: Sequence[Boundary]) -> list[str]:
    return [b.name for b in boundaries]


# ---------------------------------------------------------------------------------------------
# Properties.


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_balanced_is_optimal_against_brute_force(data: st.DataObject) -> None:
    graph = data.draw(graphs())
    n = len(graph.nodes)
    k = data.draw(st.integers(1, min(4, n)))
    order = choose_order(graph)
    segmentations = [
        (cuts, stages_from_cuts(graph, order, cuts, None))
        for cuts in itertools.combinations(range(1, n), k - 1)
    ]
    # Caps drawn from the memory the stages actually need, so that they bind: exactly at a
    # need, just below it, or absent; a device computing w requests at once holds each one's
    # activations.
    workers = [data.draw(st.integers(1, 3)) for _ in range(k)]
    needs = sorted({s.param_bytes + w * s.peak_activation_bytes
                    for _, stages in segmentations for s in stages for w in (1, 2, 3)})
    cap = st.one_of(st.none(), st.sampled_from(needs),
                    st.sampled_from(needs).map(lambda m: m - 1))
    devices = tuple(
        DeviceSpec(name=f"d{i}", speed=data.draw(st.floats(0.25, 4.0)),
                   memory_bytes=data.draw(cap), bandwidth=data.draw(st.floats(50.0, 5000.0)),
                   workers=workers[i])
        for i in range(k)
    )

    best = math.inf
    for cuts, _ in segmentations:
        stages = stages_from_cuts(graph, order, cuts, devices)
        if fits(stages, devices):
            best = min(best, bottleneck(stages))

    if math.isinf(best):
        with pytest.raises(PlanError, match="memory cap of device"):
            plan_stages(graph, k, devices)
        return
    plan = plan_stages(graph, k, devices)
    assert math.isclose(bottleneck(plan), best, rel_tol=1e-9, abs_tol=1e-12)
    assert fits(plan, devices)
    assert [key for s in plan for key in s.nodes] == [graph.nodes[v].key for v in order]
    assert_consistent(graph, plan, k)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stages_from_cuts_matches_the_cost_model(data: st.DataObject) -> None:
    graph = data.draw(graphs())
    n = len(graph.nodes)
    k = data.draw(st.integers(1, min(4, n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), min_size=k - 1,
                                    max_size=k - 1))) if n > 1 else []
    devices = data.draw(device_lists(len(cuts) + 1))
    order = choose_order(graph)
    got = stages_from_cuts(graph, order, cuts, devices)
    want = reference_stages(graph, order, cuts, devices)
    for stage, ref, dev in zip(got, want, devices, strict=False):
        assert list(stage.nodes) == ref["nodes"]
        assert names(stage.inputs) == ref["inputs"]
        assert names(stage.outputs) == ref["outputs"]
        assert math.isclose(stage.compute_s, ref["compute_s"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(stage.transfer_s, ref["transfer_s"], rel_tol=1e-9, abs_tol=1e-12)
        assert stage.flops == ref["flops"]
        assert stage.param_bytes == ref["param_bytes"]
        assert stage.peak_activation_bytes == ref["peak"]
        assert stage.memory_bytes == ref["param_bytes"] + dev.workers * ref["peak"]
    assert_consistent(graph, got, len(cuts) + 1)


@settings(max_examples=200, deadline=None)
@given(graph=graphs(max_nodes=30))
def test_choose_order_is_a_deterministic_topological_order(graph: PlanningGraph) -> None:
    order = choose_order(graph)
    assert is_topological(graph, [graph.nodes[v].key for v in order])
    assert choose_order(graph) == order


@settings(max_examples=100, deadline=None)
@given(data=st.data(), strategy=st.sampled_from(["even", "spectral"]))
def test_even_and_spectral_give_k_consistent_stages(data: st.DataObject, strategy: str) -> None:
    graph = data.draw(graphs(max_nodes=20))
    k = data.draw(st.integers(1, min(6, len(graph.nodes))))
    devices = data.draw(device_lists(k, caps=False))
    stages = plan_stages(graph, k, devices, strategy=strategy)
    assert_consistent(graph, stages, k)
    assert plan_stages(graph, k, devices, strategy=strategy) == stages


# ---------------------------------------------------------------------------------------------
# Tables.


def test_a_huge_node_in_a_chain_gets_a_stage_of_its_own() -> None:
    graph = chain([1, 1, 10, 1, 1, 1])
    stages = plan_stages(graph, 3)
    assert [s.nodes for s in stages] == [("n0", "n1"), ("n2",), ("n3", "n4", "n5")]
    assert math.isclose(bottleneck(stages), 10)


def test_a_chain_keeps_the_model_order() -> None:
    graph = chain([1.0] * 50)
    assert choose_order(graph) == tuple(range(50))


def test_a_fat_skip_tensor_is_made_just_before_its_use_and_never_cut() -> None:
    # The model order makes `big` first and keeps it live across the whole thin branch.
    nodes = [
        node("make_big", ["x"], ["big"]),
        node("s1", ["x"], ["a"]),
        node("s2", ["a"], ["b"]),
        node("s3", ["b"], ["c"]),
        node("join", ["big", "c"], ["y"]),
    ]
    graph = graph_of(nodes, {"x": 16, "big": 100_000, "a": 16, "b": 16, "c": 16, "y": 16},
                     ["x"], ["y"])
    order = [graph.nodes[v].key for v in choose_order(graph)]
    assert order == ["s1", "s2", "s3", "make_big", "join"]
    stages = plan_stages(graph, 2)
    assert "big" not in names(stages[0].outputs)
    # In the model's own order every cut would carry it.
    model_order_cut = stages_from_cuts(graph, range(5), [2])
    assert "big" in names(model_order_cut[0].outputs)


def test_a_diamond_is_not_cut_through_its_fat_edge_when_a_thin_cut_is_as_good() -> None:
    # pre -> split -> (fat) -> left -> join ; split -> right -> join -> post
    nodes = [
        node("pre", ["x"], ["p"]),
        node("split", ["p"], ["fat", "thin"]),
        node("left", ["fat"], ["l"]),
        node("right", ["thin"], ["r"]),
        node("join", ["l", "r"], ["j"]),
        node("post", ["j"], ["y"]),
    ]
    sizes = {"x": 8, "p": 8, "fat": 10**6, "thin": 8, "l": 8, "r": 8, "j": 8, "y": 8}
    graph = graph_of(nodes, sizes, ["x"], ["y"])
    devices = [DeviceSpec("a", bandwidth=1e6), DeviceSpec("b", bandwidth=1e6)]
    stages = plan_stages(graph, 2, devices)
    assert stages[0].output_bytes < 1000


def test_pass_through_tensors_cross_every_boundary_in_between() -> None:
    nodes = [
        node("n0", ["x"], ["t0"]),
        node("n1", ["t0"], ["t1"]),
        node("n2", ["t1"], ["t2"]),
        node("n3", ["t2", "t0", "late"], ["out"]),
    ]
    graph = graph_of(nodes, {"x": 4, "late": 4, "t0": 4, "t1": 4, "t2": 4, "out": 4},
                     ["x", "late"], ["out", "x"])
    stages = plan_stages(graph, 4)
    assert [s.nodes for s in stages] == [("n0",), ("n1",), ("n2",), ("n3",)]
    assert names(stages[0].inputs) == ["x", "late"]
    assert names(stages[0].outputs) == ["x", "late", "t0"]
    assert names(stages[1].outputs) == ["x", "late", "t0", "t1"]
    assert names(stages[2].outputs) == ["x", "late", "t0", "t2"]
    assert names(stages[3].outputs) == ["out", "x"]


def test_shared_weights_count_once_per_stage() -> None:
    w = [("emb", 1000)]
    nodes = [node("gather", ["ids"], ["h"], params=w), node("mid", ["h"], ["m"]),
             node("logits", ["m"], ["y"], params=w)]
    graph = graph_of(nodes, {"ids": 4, "h": 4, "m": 4, "y": 4}, ["ids"], ["y"])
    one = plan_stages(graph, 1)
    assert one[0].param_bytes == 1000
    two = stages_from_cuts(graph, [0, 1, 2], [1])
    assert [s.param_bytes for s in two] == [1000, 1000]


def test_the_faster_device_gets_more_work() -> None:
    graph = chain([1.0] * 12)
    devices = [DeviceSpec("slow", speed=1.0, bandwidth=1e12),
               DeviceSpec("fast", speed=3.0, bandwidth=1e12)]
    stages = plan_stages(graph, 2, devices)
    assert [len(s.nodes) for s in stages] == [3, 9]


def test_memory_caps_move_the_cut() -> None:
    nodes = [node(f"n{i}", [f"t{i}"], [f"t{i + 1}"], params=[(f"w{i}", 100)]) for i in range(6)]
    graph = graph_of(nodes, {f"t{i}": 1 for i in range(7)}, ["t0"], ["t6"])
    devices = [DeviceSpec("small", memory_bytes=210), DeviceSpec("big")]
    stages = plan_stages(graph, 2, devices)
    assert len(stages[0].nodes) == 2
    assert stages[0].memory_bytes <= 210


def test_each_request_a_device_computes_at_once_holds_its_own_activations() -> None:
    # 100 B of weights a node, 200 B of activations live at once: one request at a time fits
    # three nodes in 500 B, two at once (a node started --workers 2) one node, three none.
    nodes = [node(f"n{i}", [f"t{i}"], [f"t{i + 1}"], params=[(f"w{i}", 100)]) for i in range(6)]
    graph = graph_of(nodes, {f"t{i}": 100 for i in range(7)}, ["t0"], ["t6"])
    one = plan_stages(graph, 2, [DeviceSpec("small", memory_bytes=500), DeviceSpec("big")])
    assert [len(s.nodes) for s in one] == [3, 3]
    two = plan_stages(graph, 2, [DeviceSpec("small", memory_bytes=500, workers=2),
                                 DeviceSpec("big")])
    assert [len(s.nodes) for s in two] == [1, 5]
    assert two[0].memory_bytes == 100 + 2 * 200 and two[0].workers == 2
    with pytest.raises(PlanError, match=r"activations of 3 requests at once.*fewer workers"):
        plan_stages(graph, 2, [DeviceSpec("small", memory_bytes=500, workers=3),
                               DeviceSpec("big")])


def test_an_impossible_memory_cap_names_the_device() -> None:
    nodes = [node(f"n{i}", [f"t{i}"], [f"t{i + 1}"], params=[(f"w{i}", 100)]) for i in range(4)]
    graph = graph_of(nodes, {f"t{i}": 1 for i in range(5)}, ["t0"], ["t4"])
    devices = [DeviceSpec("roomy"), DeviceSpec("tiny", memory_bytes=50)]
    with pytest.raises(PlanError, match="device 'tiny'"):
        plan_stages(graph, 2, devices)
    with pytest.raises(PlanError, match="device 'tiny'"):
        plan_stages(graph, 1, devices[1:])


def test_an_even_split_that_does_not_fit_says_to_use_balanced() -> None:
    nodes = [node(f"n{i}", [f"t{i}"], [f"t{i + 1}"], params=[(f"w{i}", 100)]) for i in range(6)]
    graph = graph_of(nodes, {f"t{i}": 1 for i in range(7)}, ["t0"], ["t6"])
    devices = [DeviceSpec("small", memory_bytes=210), DeviceSpec("big")]
    with pytest.raises(PlanError, match="balanced"):
        plan_stages(graph, 2, devices, strategy="even")
    assert [len(s.nodes) for s in plan_stages(graph, 2, strategy="even")] == [3, 3]


def test_spectral_on_a_large_graph_uses_the_sparse_solver_and_stays_valid() -> None:
    # 150 blocks of 4 nodes with a residual around each: 600 nodes.
    nodes: list[PlanNode] = []
    sizes = {"h0": 64}
    for b in range(150):
        h, nxt = f"h{b}", f"h{b + 1}"
        nodes += [node(f"b{b}_norm", [h], [f"{h}_n"]), node(f"b{b}_up", [f"{h}_n"], [f"{h}_u"]),
                  node(f"b{b}_down", [f"{h}_u"], [f"{h}_d"]),
                  node(f"b{b}_add", [h, f"{h}_d"], [nxt])]
        sizes.update({f"{h}_n": 64, f"{h}_u": 256, f"{h}_d": 64, nxt: 64})
    graph = graph_of(nodes, sizes, ["h0"], ["h150"])
    stages = plan_stages(graph, 5, strategy="spectral")
    assert_consistent(graph, stages, 5)
    balanced = plan_stages(graph, 5)
    assert_consistent(graph, balanced, 5)
    assert bottleneck(balanced) <= bottleneck(stages) + 1e-9


@pytest.mark.parametrize(("k", "message"), [
    (7, "cannot cut a model of 6 operators into 7 shards: ask for at most 6"),
    (0, "ask for at least 1"),
])
def test_k_out_of_range(k: int, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_stages(chain([1.0] * 6), k)


def test_unknown_strategy() -> None:
    with pytest.raises(PlanError, match="unknown strategy 'greedy'"):
        plan_stages(chain([1.0] * 6), 2, strategy="greedy")


def test_too_few_devices() -> None:
    with pytest.raises(PlanError, match="lists 2 devices but 3 shards"):
        plan_stages(chain([1.0] * 6), 3, [DeviceSpec("a"), DeviceSpec("b")])


@pytest.mark.parametrize(("order", "cuts", "message"), [
    (range(6), [0], "out of range"),
    (range(6), [6], "out of range"),
    (range(6), [3, 2], "strictly increase"),
    (range(6), [2, 2], "strictly increase"),
    ([1, 0, 2, 3, 4, 5], [2], "not topological"),
    ([0, 1, 2, 3, 4], [2], "exactly once"),
])
def test_bad_segmentations_are_refused(order: Sequence[int], cuts: list[int],
                                       message: str) -> None:
    with pytest.raises(PlanError, match=message):
        stages_from_cuts(chain([1.0] * 6), order, cuts, None)


def test_a_read_of_an_unknown_tensor_is_refused() -> None:
    graph = graph_of([node("n0", ["ghost"], ["y"])], {"y": 4}, [], ["y"])
    with pytest.raises(PlanError, match="'ghost'"):
        plan_stages(graph, 1)


def test_spectral_gives_no_stage_that_computes_nothing() -> None:
    """A transformer's constants (564 of stories260K's 1,580 nodes) share no bytes with its
    compute, and spectral clustering set them apart as stages of their own that computed
    nothing (0 µs, 0 µs and the whole model at K = 3). They now join their neighbours, and the
    compute is split in equal shares."""
    from periphery_core.model import load_model
    from periphery_core.model.analysis import analyze
    from periphery_core.partition.planner import make_plan
    from tests.conftest import MODELS, require_shared

    require_shared()
    analysis = analyze(load_model(MODELS / "stories260K.onnx"), {"tokens": (1, 8)})
    for k in (2, 3, 4):
        plan = make_plan(analysis, k, strategy="spectral")
        assert all(s.compute_s > 0 for s in plan.stages), [s.compute_s for s in plan.stages]
        assert plan.balance_ratio < 1.2, (k, plan.balance_ratio)
