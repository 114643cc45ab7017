"""Planning a language model: balanced on a measured decode step, caches counted.

FLOP estimates mislead most on a quantized decoder: on SmolLM2 (int4 MatMulNBits) the FLOPs put
a fifth of the work in the vocabulary projection and the node speed check (an fp32 GEMM) makes
the compute look about 5x cheaper than it is against the logits the last stage sends, so the
estimate-balanced K = 2 plan ran 8.8 ms against 1.9 ms per token. A decoder is therefore
planned on each node's measured time in one decode step (ONNX Runtime's profiler, one thread,
`PROFILE_CONTEXT` cached tokens; nodes doing the same work get the same time), with the nodes'
speeds taken relative to each other (the measurement is in this machine's seconds, not in the
speed check's units), and each stage's caches counted against its memory
(`DecoderSpec.planned_state`).

Any other model is planned on its FLOP estimates scaled to its own speed (`calibrated`): the
estimates put the time in the right nodes well enough, but not how long it takes, off by 9x on
a depthwise-convolution detector and 40-70x on small models whose nodes each cost more to
dispatch than to compute, so every prediction ("2 replicas x 1 stage: 1,450 requests/s
predicted" where 161 were served) misled, and so did the weight of compute against a link's
transfer. The whole model is run and timed here, as a node runs a stage (one thread, graph
optimizations on), against what the estimates predict for this host's speed check (the same
check every node reports its speed by); the ratio scales every node's estimate.

`plan_model` is the one planner entry for every face (the pipeline, the CLI, the app).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from collections.abc import Sequence

import numpy as np

from periphery_core.errors import PeripheryError
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.model.analysis import ModelAnalysis, with_measurements
from periphery_core.model.loading import LoadedModel
from periphery_core.model.profile import profile_model
from periphery_core.partition.plan import DeviceSpec, ShardPlan
from periphery_core.partition.planner import make_plan, replan_with_cuts
from periphery_core.partition.planning_graph import node_cost_s
from periphery_core.partition.shape import choose_shape
from periphery_core.runtime.feeds import random_feeds
from periphery_core.runtime.session import SessionConfig, make_session, run_session

log = logging.getLogger("periphery.planning")

PROFILE_CONTEXT = 64  # cached tokens in the decode step the plan is balanced on
# Within this fraction of the best bottleneck, the cuts that send the fewest bytes: measured
# costs vary by a few percent from run to run, and a cut should not follow that noise into the
# middle of an MLP (two 1,536-wide projections cross there, against one 576-wide hidden state
# between layers).
SLACK = 0.03

# A model with more weights than this is planned on its estimates as they are: running it
# here would take the master the memory its nodes are there to hold.
CALIBRATE_MAX_BYTES = 1 << 30
CALIBRATE_BUDGET_S = 0.3  # timed runs of the whole model for about this long (3 at least)

_measured: dict[tuple[str, str, int], ModelAnalysis] = {}
# (sha256, input shapes) -> cost_scale, or None where the model did not run here (tried once)
_scales: dict[tuple[str, str], float | None] = {}
_host_speed: list[float] = []  # this host's speed check, once per process
_lock = threading.Lock()


def decode_feeds(spec: DecoderSpec, context: int = PROFILE_CONTEXT) -> dict[str, np.ndarray]:
    """Inputs of one decode step of a sequence with `context` cached tokens."""
    feeds: dict[str, np.ndarray] = {spec.input_ids: np.zeros((1, 1), dtype=spec.ids_dtype)}
    for slot in spec.slots:
        shape = list(slot.empty_shape)
        shape[slot.axis] = context
        feeds[slot.past] = np.zeros(shape, dtype=slot.dtype)
    if spec.mask:
        feeds[spec.mask] = np.ones((1, context + 1), dtype=spec.mask_dtype)
    if spec.positions:
        feeds[spec.positions] = np.full((1, 1), context, dtype=spec.positions_dtype)
    return feeds


def calibrated(loaded: LoadedModel, analysis: ModelAnalysis) -> ModelAnalysis:
    """`analysis` with its estimates scaled to the model's timed run on this host (see the
    module docstring; measured once per model and input shapes, and kept). A model too big to
    run here, or one that does not run on random inputs, keeps its estimates as they are."""
    if analysis.cost_scale is not None or analysis.profiled or not analysis.nodes \
            or analysis.total_param_bytes > CALIBRATE_MAX_BYTES:
        return analysis
    key = (analysis.sha256, repr(sorted(analysis.input_shapes.items())))
    with _lock:
        known, scale = key in _scales, _scales.get(key)
    if not known:
        try:
            scale = _measure_scale(loaded, analysis)
        except PeripheryError as exc:
            log.info("planning on estimates: the model did not run here (%s)", exc.message)
        with _lock:
            _scales[key] = scale
    return analysis if scale is None else dataclasses.replace(analysis, cost_scale=scale)


def _measure_scale(loaded: LoadedModel, analysis: ModelAnalysis) -> float:
    """The model's fastest timed run here over what its estimates predict for this host."""
    from periphery_core.cluster.speed import measure_speed

    sess = make_session(str(loaded.path) if loaded.has_external_data else loaded.proto,
                        SessionConfig(exact=False, threads=1))
    feeds = random_feeds(analysis.inputs)
    run_session(sess, feeds)  # warm-up
    best = float("inf")
    runs, end = 0, time.perf_counter() + CALIBRATE_BUDGET_S
    while runs < 3 or (time.perf_counter() < end and runs < 200):
        t0 = time.perf_counter()
        run_session(sess, feeds)
        best, runs = min(best, time.perf_counter() - t0), runs + 1
    with _lock:
        if not _host_speed:  # the fastest of many short runs: what the host does uncontended
            _host_speed.append(measure_speed(budget_s=0.15))
        speed = _host_speed[0]
    estimated = sum(node_cost_s(n) for n in analysis.nodes
                    if n.key not in analysis.constant_nodes) / speed
    return best / estimated if estimated > 0 else 1.0


def planning_analysis(loaded: LoadedModel, analysis: ModelAnalysis,
                      decoder: DecoderSpec | None) -> ModelAnalysis:
    """The analysis a plan of this model is balanced on: for a decoder, with each node's
    measured time in one decode step (measured once per model and kept); else its estimates
    scaled to its timed run (`calibrated`)."""
    if decoder is None:
        return calibrated(loaded, analysis)
    key = (analysis.path, analysis.sha256, id(loaded))
    with _lock:
        found = _measured.get(key)
    if found is None:
        found = _alike_cost_alike(
            profile_model(loaded, analysis, runs=5, threads=1, feeds=decode_feeds(decoder)))
        with _lock:
            if len(_measured) >= 4:
                _measured.pop(next(iter(_measured)))
            _measured[key] = found
    return found


def _alike_cost_alike(measured: ModelAnalysis) -> ModelAnalysis:
    """Each node's measured time replaced by the median over the nodes doing the same work
    (operator, input and output shapes, weight bytes): a decoder's layers then cost the same,
    and the plan does not move from one run to the next with the profiler's noise (it cut
    SmolLM2 at K = 3 between layers on one run and inside an MLP on the next)."""
    groups: dict[tuple[object, ...], list[float]] = {}
    keys = []
    for n in measured.nodes:
        shapes = tuple(measured.tensors[x].shape if x in measured.tensors else
                       ("w", measured.initializers.get(x, 0)) for x in (*n.inputs, *n.outputs))
        key = (n.domain, n.op_type, shapes)
        keys.append(key)
        if n.measured_s is not None:
            groups.setdefault(key, []).append(n.measured_s)
    alike = {k: statistics.median(v) for k, v in groups.items()}
    return with_measurements(measured, {n.key: alike.get(k, 0.0)
                                        for n, k in zip(measured.nodes, keys, strict=True)})


def relative_speeds(devices: Sequence[DeviceSpec] | None) -> list[DeviceSpec] | None:
    """The devices with speeds relative to their median (measured costs are seconds on this
    machine; what the nodes' speeds add is how much faster one is than another), each
    computing one step at a time: a decoder's stage takes its steps in order, whatever its
    node's workers, so it holds one step's activations."""
    if not devices:
        return None
    middle = statistics.median(d.speed for d in devices) or 1.0
    return [dataclasses.replace(d, speed=d.speed / middle, workers=1) for d in devices]


def plan_model(loaded: LoadedModel, analysis: ModelAnalysis, k: int, *,
               strategy: str = "balanced", devices: Sequence[DeviceSpec] | None = None,
               decoder: DecoderSpec | None = None, use_profile: bool = False) -> ShardPlan:
    """Plan `k` stages: a decoder on a measured decode step with its caches counted (see the
    module docstring), any other model by `make_plan` (`use_profile`: on `analysis`'s own
    measured times)."""
    if decoder is None:
        return make_plan(analysis if use_profile else calibrated(loaded, analysis), k,
                         strategy=strategy, devices=devices, use_profile=use_profile)
    return make_plan(planning_analysis(loaded, analysis, decoder), k, strategy=strategy,
                     devices=relative_speeds(devices), use_profile=True,
                     state=decoder.planned_state(), slack=SLACK)


def plan_shape(loaded: LoadedModel, analysis: ModelAnalysis,
               devices: Sequence[DeviceSpec], *, k: int | None = None,
               replicas: int | None = None, strategy: str = "balanced",
               decoder: DecoderSpec | None = None, use_profile: bool = False) -> ShardPlan:
    """Plan R replicas of K stages for these devices (`partition.shape`): the planner
    chooses what is not forced. A decoder is weighed the same way, on its measured decode
    step: one that fits a node runs as replicas, each sequence on one of them with its caches
    (the master keeps its steps there), and one too big for a node gets stages.

    Raises:
        PlanError: a shape that does not fit.
    """

    def plan_k(kk: int, devs: Sequence[DeviceSpec]) -> ShardPlan:
        return plan_model(loaded, analysis, kk, strategy=strategy, devices=devs,
                          decoder=decoder, use_profile=use_profile)

    def recost(plan: ShardPlan, devs: Sequence[DeviceSpec]) -> ShardPlan:
        return replan_model(loaded, analysis, plan, plan.cuts, devs, decoder)

    return choose_shape(devices, plan_k, recost, k=k, replicas=replicas,
                        max_k=len(analysis.nodes))


def replan_model(loaded: LoadedModel, analysis: ModelAnalysis, plan: ShardPlan,
                 cuts: Sequence[int], devices: Sequence[DeviceSpec] | None = None,
                 decoder: DecoderSpec | None = None) -> ShardPlan:
    """`plan`'s node order cut at `cuts` (a boundary moved by hand), costed as `plan_model`
    costs it."""
    if decoder is None:
        return replan_with_cuts(analysis if plan.cost_basis == "profile" else
                                calibrated(loaded, analysis), plan, cuts, devices)
    return replan_with_cuts(planning_analysis(loaded, analysis, decoder), plan, cuts,
                            relative_speeds(devices), state=decoder.planned_state())
