"""Per-shard quantization: each pipeline stage with its own method, calibrated where it runs.

A stage's calibration data must be what that stage sees in the pipeline: the activations the
earlier stages produce from the calibration inputs. The calibration batches are therefore run
through the float shards stage by stage in ONNX Runtime (`exact=True`, as the local chain does),
and stage i is quantized on the tensors stage i-1 hands on. The earlier stages stay float for
this purpose even when they are quantized themselves, so each stage is calibrated against the
float model's own activations and one stage's quantization error does not shape another's
ranges. Only one boundary's activations are held at a time.

Stages are named with the whole model's node keys before quantizing, so a stage config's
`exclude` uses the same names as the plan.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from periphery_core.model.analysis import ModelAnalysis
from periphery_core.model.graph import node_keys
from periphery_core.model.loading import LoadedModel
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.plan import ShardPlan
from periphery_core.progress import CancelToken, ProgressFn, check, report
from periphery_core.quantize.config import CONFIG_TYPES, QuantConfig, QuantizeError
from periphery_core.quantize.engine import FeedSource
from periphery_core.quantize.methods import NothingToQuantize, QuantResult, quantize
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.session import SessionConfig

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class StageQuantized:
    """One stage after per-shard quantization; `result` is None where it stayed float."""

    index: int
    model: onnx.ModelProto
    result: QuantResult | None


class ActivationSource:
    """Recorded stage inputs served as a `FeedSource`.

    Batches come back as recorded when asked for the recorded batch size; otherwise recorded
    batches are joined along axis 0 (the batch axis) into batches of the size asked for.
    """

    def __init__(self, batches: Sequence[Feeds], names: Sequence[str]) -> None:
        self.recorded = list(batches)
        self.names = tuple(names)

    def __len__(self) -> int:
        return sum(_count(b) for b in self.recorded)

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        pending: list[Feeds] = []
        for batch in self.recorded:
            if not pending and _count(batch) == batch_size:
                yield batch
                continue
            pending.append(batch)
            if sum(_count(b) for b in pending) >= batch_size:
                yield _join(pending)
                pending = []
        if pending:
            yield _join(pending)

    def labels(self) -> None:
        return None


def _count(batch: Feeds) -> int:
    first = next(iter(batch.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _join(batches: list[Feeds]) -> Feeds:
    if len(batches) == 1:
        return batches[0]
    return {n: np.concatenate([b[n] for b in batches], axis=0) for n in batches[0]}


def _named_like_model(shard: onnx.ModelProto, keys_by_output: Mapping[str, str]) -> None:
    """Give every node of a shard the key its node has in the whole model."""
    for node in shard.graph.node:
        first = next((o for o in node.output if o), None)
        if first is not None and first in keys_by_output:
            node.name = keys_by_output[first]


def quantize_stages(
    loaded: LoadedModel,
    analysis: ModelAnalysis,
    plan: ShardPlan,
    configs: Mapping[int, QuantConfig],
    calib: FeedSource | None,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    session: SessionConfig | None = None,
) -> list[StageQuantized]:
    """Extract the plan's shards and quantize the stages `configs` names.

    Args:
        loaded: the float model.
        analysis: its analysis (as for `extract_shards`).
        plan: the plan the shards follow.
        configs: stage index -> config; stages not listed stay float.
        calib: calibration inputs for the whole model (needed when a listed method calibrates).
        session: how calibration runs the float shards (default: exact, CPU).

    Raises:
        QuantizeError: a stage index outside the plan, missing calibration data, or a method
            failed on a stage.
        PlanError, ExtractError: the plan does not fit the model.
        Cancelled: `cancel` was set.
    """
    for index, config in configs.items():
        if not isinstance(index, int) or not 0 <= index < plan.k:
            raise QuantizeError(f"stage {index} is not in the plan (stages 0..{plan.k - 1})")
        if not isinstance(config, CONFIG_TYPES):
            raise QuantizeError(f"stage {index}: not a quantization config: "
                                f"{type(config).__name__}")
    calibrating = sorted(i for i, c in configs.items() if c.calibrated)
    if calibrating and calib is None:
        i = calibrating[0]
        raise QuantizeError(f"stage {i} uses method {configs[i].method}, which needs "
                            "calibration data: give a calibration source")
    shards = extract_shards(loaded, analysis, plan, cancel=cancel)
    keys_by_output = {
        o: key for node, key in zip(loaded.proto.graph.node, node_keys(loaded.proto.graph),
                                    strict=True)
        for o in node.output[:1] if o
    }
    last = calibrating[-1] if calibrating else -1
    samples = max((getattr(configs[i], "samples", 1) for i in calibrating), default=0)
    batch = min((getattr(configs[i], "batch_size", 1) for i in calibrating), default=1)
    exact = session or SessionConfig(exact=True)

    out: list[StageQuantized] = []
    source: FeedSource | None = calib
    for i, shard in enumerate(shards):
        check(cancel)
        report(progress, "quantize stages", i, plan.k, f"stage {i}")
        stage_config = configs.get(i)
        result: QuantResult | None = None
        if stage_config is not None:
            _named_like_model(shard, keys_by_output)
            try:
                result = quantize(shard, stage_config,
                                  source if stage_config.calibrated else None,
                                  progress=progress, cancel=cancel)
            except NothingToQuantize:
                result = None  # a stage without weights stays as it is
        if i < last and source is not None:
            source = _next_activations(shard, source, samples, batch, exact, i, progress, cancel)
        out.append(StageQuantized(i, result.model if result else shard, result))
    report(progress, "quantize stages", plan.k, plan.k, "done")
    return out


def _next_activations(
    shard: onnx.ModelProto,
    source: FeedSource,
    samples: int,
    batch: int,
    session: SessionConfig,
    index: int,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
) -> ActivationSource:
    """Run the float `shard` on up to `samples` inputs from `source`; record its outputs."""
    runner = StageRunner(shard, session)
    recorded: list[Feeds] = []
    seen = 0
    total = max(1, min(samples, len(source)))
    for feeds in source.batches(batch):
        check(cancel)
        recorded.append(runner.run(feeds))
        seen += _count(feeds)
        report(progress, "stage activations", min(seen, total), total, f"stage {index}")
        if seen >= samples:
            break
    return ActivationSource(recorded, runner.output_names)


def quantize_plan(
    loaded: LoadedModel,
    analysis: ModelAnalysis,
    plan: ShardPlan,
    configs: Mapping[int, QuantConfig],
    calib: FeedSource | None,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> list[onnx.ModelProto]:
    """The plan's shards, stages listed in `configs` quantized (see `quantize_stages`)."""
    stages = quantize_stages(loaded, analysis, plan, configs, calib, progress=progress,
                             cancel=cancel)
    return [s.model for s in stages]
