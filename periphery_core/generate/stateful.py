"""Stateful stages: each stage keeps the KV cache of its own layers, per sequence.

`make_stateful` rewrites a decoder's shards so that no cache crosses a boundary: a stage takes
as graph inputs only the cache tensors its own layers read, and the cache tensors it writes stay
among its outputs but are kept by the stage (never sent on); caches of other layers that merely
passed through are dropped. The attention mask and position ids, which every layer may read
and which grow with the context, are made by each stage from the sequence's length. What
remains on the wire per decoded token is the hidden state and a few small tensors.

The rewrite is recorded in the shard's metadata (`periphery.state`, JSON), so a node knows
from the shard alone which inputs it feeds itself. `StatefulStage` runs such a shard: it holds
each sequence's cache within a byte budget, feeds it, stores what the stage returns, and frees
a sequence's cache when told.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from periphery_core.errors import ClusterBusy, RuntimeFailure
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.model.analysis import node_inputs
from periphery_core.runtime.chain import StageRunner

STATE_KEY = "periphery.state"
# Said by a stage asked to continue a sequence it holds no cache for (a redeployed pipeline):
# the generation loop then rebuilds the sequence's caches and goes on.
CACHE_LOST = "its cache was lost"


@dataclass(frozen=True)
class StageState:
    """What a stateful shard feeds itself: cache slots, and inputs made from the length."""

    slots: tuple[tuple[str, str, tuple[int, ...], str, int], ...]  # past, present, shape, dt, axis
    mask: tuple[str, str] | None = None  # (input name, dtype)
    positions: tuple[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps({"slots": [list(s) for s in self.slots], "mask": self.mask,
                           "positions": self.positions})

    @classmethod
    def from_json(cls, text: str) -> StageState:
        data = json.loads(text)
        slots = tuple((str(p), str(q), tuple(int(d) for d in shape), str(dt), int(axis))
                      for p, q, shape, dt, axis in data["slots"])
        mask = tuple(data["mask"]) if data.get("mask") else None
        positions = tuple(data["positions"]) if data.get("positions") else None
        return cls(slots, mask, positions)


def stage_state(shard: onnx.ModelProto) -> StageState | None:
    """The state a shard feeds itself, if it is a stateful shard."""
    for prop in shard.metadata_props:
        if prop.key == STATE_KEY:
            return StageState.from_json(prop.value)
    return None


def make_stateful(shards: Sequence[onnx.ModelProto], spec: DecoderSpec) -> list[onnx.ModelProto]:
    """Copies of a decoder's shards that keep their own caches (see the module docstring)."""
    pasts = {s.past: s for s in spec.slots}
    presents = {s.present for s in spec.slots}
    made = {n for n in (spec.mask, spec.positions) if n}
    out: list[onnx.ModelProto] = []
    for shard in shards:
        new = onnx.ModelProto()
        new.CopyFrom(shard)
        graph = new.graph
        read = {n for node in graph.node for n in node_inputs(node)}
        written = {o for node in graph.node for o in node.output}
        keep_in = [vi for vi in graph.input if vi.name in read
                   or not (vi.name in pasts or vi.name in made or vi.name in presents)]
        del graph.input[:]
        graph.input.extend(keep_in)
        keep_out = [vi for vi in graph.output
                    if not (vi.name in presents and vi.name not in written)
                    and not (vi.name in pasts or vi.name in made)]
        del graph.output[:]
        graph.output.extend(keep_out)
        inputs = {vi.name for vi in graph.input}
        state = StageState(
            slots=tuple((p, s.present, s.empty_shape, s.dtype, s.axis)
                        for p, s in pasts.items() if p in inputs),
            mask=(spec.mask, spec.mask_dtype) if spec.mask and spec.mask in inputs else None,
            positions=(spec.positions, spec.positions_dtype)
            if spec.positions and spec.positions in inputs else None,
        )
        new.metadata_props.add(key=STATE_KEY, value=state.to_json())
        out.append(new)
    return out


@dataclass
class _Sequence:
    length: int
    cache: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.cache.values())


class StatefulStage:
    """Runs a stateful shard for many sequences, each with its own cache.

    Args:
        runner: the shard's session.
        state: what the shard feeds itself (`stage_state`).
        budget_bytes: the most cache memory all sequences together may hold; a step that would
            exceed it fails with `ClusterBusy` and leaves the sequence as it was.
    """

    def __init__(self, runner: StageRunner, state: StageState, budget_bytes: int) -> None:
        self.runner = runner
        self.state = state
        self.budget_bytes = budget_bytes
        self._seqs: dict[int, _Sequence] = {}
        self._lock = threading.Lock()
        self._presents = {q for _, q, _, _, _ in state.slots}
        fed = {p for p, _, _, _, _ in state.slots}
        fed |= {made[0] for made in (state.mask, state.positions) if made is not None}
        self.input_names = [n for n in runner.input_names if n not in fed]
        self.output_names = [n for n in runner.output_names if n not in self._presents]

    @property
    def cache_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._seqs.values())

    @property
    def sequences(self) -> int:
        with self._lock:
            return len(self._seqs)

    def release(self, seqs: Sequence[int]) -> None:
        with self._lock:
            for s in seqs:
                self._seqs.pop(s, None)

    def run(self, values: Mapping[str, np.ndarray], seq: int, pos: int,
            new: int) -> dict[str, np.ndarray]:
        """One step of sequence `seq`: `pos` tokens are cached, `new` arrive now."""
        with self._lock:
            current = self._seqs.get(seq)
        length = current.length if current is not None else 0
        if length != pos:
            raise RuntimeFailure(
                f"sequence {seq} holds {length} cached tokens here but the step says {pos}: "
                f"{CACHE_LOST} (a node restarted?); start the sequence again")
        feeds: dict[str, Any] = dict(values)
        for past, _, shape, dtype, _axis in self.state.slots:
            feeds[past] = current.cache[past] if current is not None \
                else np.zeros(shape, dtype=dtype)
        if self.state.mask is not None:
            name, dtype = self.state.mask
            feeds[name] = np.ones((1, pos + new), dtype=dtype)
        if self.state.positions is not None:
            name, dtype = self.state.positions
            feeds[name] = np.arange(pos, pos + new, dtype=dtype)[np.newaxis]
        outputs = self.runner.run(feeds)
        cache = {p: outputs[q] for p, q, _, _, _ in self.state.slots}
        needed = sum(int(v.nbytes) for v in cache.values())
        with self._lock:
            others = sum(s.nbytes for k, s in self._seqs.items() if k != seq)
            if others + needed > self.budget_bytes:
                raise ClusterBusy(
                    f"busy: the KV cache budget ({self.budget_bytes / 2**20:.0f} MiB) is full "
                    f"with {len(self._seqs)} sequences; retry when one ends, or give the node "
                    "a larger --kv-budget")
            self._seqs[seq] = _Sequence(pos + new, cache)
        return {k: v for k, v in outputs.items() if k not in self._presents}
