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

`plan_model` is the one planner entry for every face (the pipeline, the CLI, the app); a model
that is not a decoder is planned as before.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
from collections.abc import Sequence

import numpy as np

from periphery_core.generate.decoder import DecoderSpec
from periphery_core.model.analysis import ModelAnalysis, with_measurements
from periphery_core.model.loading import LoadedModel
from periphery_core.model.profile import profile_model
from periphery_core.partition.plan import DeviceSpec, ShardPlan
from periphery_core.partition.planner import make_plan, replan_with_cuts
from periphery_core.partition.shape import choose_shape

PROFILE_CONTEXT = 64  # cached tokens in the decode step the plan is balanced on
# Within this fraction of the best bottleneck, the cuts that send the fewest bytes: measured
# costs vary by a few percent from run to run, and a cut should not follow that noise into the
# middle of an MLP (two 1,536-wide projections cross there, against one 576-wide hidden state
# between layers).
SLACK = 0.03

_measured: dict[tuple[str, str, int], ModelAnalysis] = {}
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


def planning_analysis(loaded: LoadedModel, analysis: ModelAnalysis,
                      decoder: DecoderSpec | None) -> ModelAnalysis:
    """The analysis a plan of this model is balanced on: for a decoder, with each node's
    measured time in one decode step (measured once per model and kept); else as it is."""
    if decoder is None:
        return analysis
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
        return make_plan(analysis, k, strategy=strategy, devices=devices,
                         use_profile=use_profile)
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
        return replan_with_cuts(analysis, plan, cuts, devices)
    return replan_with_cuts(planning_analysis(loaded, analysis, decoder), plan, cuts,
                            relative_speeds(devices), state=decoder.planned_state())
