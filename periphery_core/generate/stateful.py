"""Stateful stages: each stage keeps the KV cache of its own layers, per sequence.

`make_stateful` rewrites a decoder's shards so that no cache crosses a boundary: a stage takes
as graph inputs only the cache tensors its own layers read, and the cache tensors it writes stay
among its outputs but are kept by the stage (never sent on); caches of other layers that merely
passed through are dropped. The attention mask and position ids, which every layer may read
and which grow with the context, are made by each stage from the sequence's length. What
remains on the wire per decoded token is the hidden state and a few small tensors.

The rewrite is recorded in the shard's metadata (`periphery.state`, JSON), so a node knows
from the shard alone which inputs it feeds itself (and, on the last stage, which output is the
logits: only their last position is sent home). `StatefulStage` runs such a shard: it holds
each sequence's cache within a byte budget, feeds it, stores what the stage returns, and frees
a sequence's cache when told.

On a GPU (the shard's session runs on CUDA) the caches stay in GPU memory as ONNX Runtime
values, fed back through an IOBinding: per step only the new token's activations cross the
PCIe bus, not every layer's whole cache twice. Where the CPU path would copy a cache anyway (a
batch of other sequences than the one that made it), the GPU path copies it to the host too.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import onnx
import onnxruntime as ort

from periphery_core.errors import ClusterBusy, RuntimeFailure
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.model.graph import node_inputs
from periphery_core.runtime.chain import StageRunner

STATE_KEY = "periphery.state"
# Said by a stage asked to continue a sequence it holds no cache for (a redeployed pipeline):
# the generation loop then rebuilds the sequence's caches and goes on.
CACHE_LOST = "its cache was lost"


Slot = tuple[str, str, tuple[int, ...], str, int, int, str]
"""One cache slot of a stage: past, present, empty shape, dtype, sequence axis, batch axis,
layout (`CacheSlot`)."""


@dataclass(frozen=True)
class StageState:
    """What a stateful shard feeds itself: cache slots, and inputs made from the length."""

    slots: tuple[Slot, ...]
    mask: tuple[str, str] | None = None  # (input name, dtype)
    positions: tuple[str, str] | None = None
    logits: str | None = None  # the logits, where this stage makes them (the last stage)

    def to_json(self) -> str:
        return json.dumps({"slots": [list(s) for s in self.slots], "mask": self.mask,
                           "positions": self.positions, "logits": self.logits})

    @classmethod
    def from_json(cls, text: str) -> StageState:
        data = json.loads(text)
        slots = tuple((str(s[0]), str(s[1]), tuple(int(d) for d in s[2]), str(s[3]), int(s[4]),
                       int(s[5]) if len(s) > 5 else 0, str(s[6]) if len(s) > 6 else "appended")
                      for s in data["slots"])
        mask = tuple(data["mask"]) if data.get("mask") else None
        positions = tuple(data["positions"]) if data.get("positions") else None
        logits = str(data["logits"]) if data.get("logits") else None
        return cls(slots, mask, positions, logits)


def greedy_name(logits: str) -> str:
    """The output a greedy step's last stage sends instead of the logits: each row's best
    token id."""
    return f"{logits}.argmax"


def stage_state(shard: onnx.ModelProto) -> StageState | None:
    """The state a shard feeds itself, if it is a stateful shard."""
    for prop in shard.metadata_props:
        if prop.key == STATE_KEY:
            return StageState.from_json(prop.value)
    return None


def make_stateful(shards: Sequence[onnx.ModelProto], spec: DecoderSpec) -> list[onnx.ModelProto]:
    """Copies of a decoder's shards that keep their own caches (see the module docstring)."""
    copies = []
    for shard in shards:
        copies.append(onnx.ModelProto())
        copies[-1].CopyFrom(shard)
    return list(stateful(copies, spec))


def stateful(shards: Iterable[onnx.ModelProto], spec: DecoderSpec) -> Iterator[onnx.ModelProto]:
    """Each of a decoder's shards, made in place (no copy of its weights) into one that keeps
    its own caches, as it is asked for: a deploy holds one stage at a time."""
    pasts = {s.past: s for s in spec.slots}
    presents = {s.present for s in spec.slots}
    made = {n for n in (spec.mask, spec.positions) if n}
    for new in shards:
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
            slots=tuple((p, s.present, s.empty_shape, s.dtype, s.axis, s.batch_axis, s.layout)
                        for p, s in pasts.items() if p in inputs),
            mask=(spec.mask, spec.mask_dtype) if spec.mask and spec.mask in inputs else None,
            positions=(spec.positions, spec.positions_dtype)
            if spec.positions and spec.positions in inputs else None,
            logits=spec.logits if spec.logits in {o.name for o in graph.output} else None,
        )
        new.metadata_props.add(key=STATE_KEY, value=state.to_json())
        yield new


class _OnHost:
    """A batched run's cache output left on the GPU, copied to the host at most once (when one
    of its sequences next runs in other company)."""

    def __init__(self, value: ort.OrtValue) -> None:
        self.value = value
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self.value.numpy()
        return self._array


@dataclass(frozen=True)
class _Rows:
    """One sequence's rows of such an output."""

    source: _OnHost
    index: tuple[slice, ...]
    nbytes: int


Cached: TypeAlias = np.ndarray | ort.OrtValue | _Rows
"""A cache tensor: a host array, a GPU-resident value, or rows of a GPU-resident batch."""


def _nbytes(value: Cached) -> int:
    if isinstance(value, ort.OrtValue):
        return int(value.tensor_size_in_bytes())
    return int(value.nbytes)


def _host(value: Cached) -> np.ndarray:
    if isinstance(value, ort.OrtValue):
        return value.numpy()
    if isinstance(value, _Rows):
        return value.source.array()[value.index]
    return value


def _feedable(value: Cached) -> np.ndarray | ort.OrtValue:
    return _host(value) if isinstance(value, _Rows) else value


def _length(value: np.ndarray | ort.OrtValue, axis: int) -> int:
    return int(value.shape()[axis] if isinstance(value, ort.OrtValue) else value.shape[axis])


@dataclass
class _Sequence:
    length: int
    cache: dict[str, Cached] = field(default_factory=dict)
    batch: int = 0  # the batched run whose outputs hold this cache (0: its own run)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(v) for v in self.cache.values())


class StatefulStage:
    """Runs a stateful shard for many sequences, each with its own cache.

    Args:
        runner: the shard's session.
        state: what the shard feeds itself (`stage_state`).
        budget_bytes: the most cache memory all sequences together may hold; a step that would
            exceed it fails with `ClusterBusy` and leaves the sequence as it was.
        on_device: keep caches where the session computes them (see the module docstring);
            None: when the session runs on a GPU and so does the attention that reads and
            writes them (a CPU-only attention kernel would copy them back each step).
    """

    def __init__(self, runner: StageRunner, state: StageState, budget_bytes: int,
                 on_device: bool | None = None) -> None:
        self.runner = runner
        self.on_device = runner.resident_on_device([s[0] for s in state.slots],
                                                   [s[1] for s in state.slots]) \
            if on_device is None else on_device
        self.state = state
        self.budget_bytes = budget_bytes
        self._seqs: dict[int, _Sequence] = {}
        self._lock = threading.Lock()
        # batched runs whose outputs still hold some sequence's cache: batch -> (its
        # sequences, its cache outputs), so the same sequences' next step reuses them (with
        # several batches in flight, each comes back to a stage in turn)
        self._batches: dict[int, tuple[tuple[int, ...], dict[str, np.ndarray | ort.OrtValue]]] = {}
        self._presents = {s[1] for s in state.slots}
        fed = {s[0] for s in state.slots}
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
            self._forget_batches()

    def run(self, values: Mapping[str, np.ndarray], seq: int, pos: int,
            new: int, greedy: bool = False) -> dict[str, np.ndarray]:
        """One step of sequence `seq`: `pos` tokens are cached, `new` arrive now."""
        with self._lock:
            current = self._seqs.get(seq)
        self._check_length(seq, pos, current)
        feeds: dict[str, Any] = dict(values)
        for past, _, shape, dtype, *_ in self.state.slots:
            feeds[past] = _feedable(current.cache[past]) if current is not None \
                else np.zeros(shape, dtype=dtype)
        if self.state.mask is not None:
            name, dtype = self.state.mask
            feeds[name] = np.ones((1, pos + new), dtype=dtype)
        if self.state.positions is not None:
            name, dtype = self.state.positions
            feeds[name] = np.arange(pos, pos + new, dtype=dtype)[np.newaxis]
        outputs, kept = self._run(feeds, self.on_device)
        outputs = self._last_position(outputs, greedy)
        cache = {s[0]: kept.get(s[1], outputs.get(s[1])) for s in self.state.slots}
        self._store({seq: _Sequence(pos + new, cache)})
        return {k: v for k, v in outputs.items() if k not in self._presents}

    def run_batch(self, values: Mapping[str, np.ndarray], seqs: Sequence[int],
                  poss: Sequence[int], greedy: bool = False) -> dict[str, np.ndarray]:
        """One decode step (one new token each) of several sequences in one run.

        `values` hold the sequences' rows in the order of `seqs`; `poss` are their cached
        lengths. The pasts are padded to the longest and stacked on the batch axis, the mask
        hides the padding and each row's positions start at its own length; afterwards each
        sequence keeps its own rows. When the batch is the same sequences as the run that made
        their caches and every cache is "packed" (its new token lands right after its own),
        that run's outputs are already this run's padded pasts, and nothing is copied.
        """
        if len(set(seqs)) != len(seqs) or len(seqs) != len(poss) or not seqs:
            raise RuntimeFailure("a batched step must name distinct sequences, one position "
                                 "each")
        with self._lock:
            current = [self._seqs.get(s) for s in seqs]
        for seq, pos, cur in zip(seqs, poss, current, strict=True):
            self._check_length(seq, pos, cur)
        rows, longest = len(seqs), max(poss)
        feeds: dict[str, Any] = dict(values)
        packed = all(s[6] == "packed" for s in self.state.slots)
        made_by = {c.batch if c is not None else -1 for c in current}
        with self._lock:  # the run that made every one of these caches, if one did
            last = self._batches.get(made_by.pop()) if len(made_by) == 1 else None
        reuse = (packed and last is not None and last[0] == tuple(seqs)
                 and all(_length(last[1][s[0]], s[4]) == longest for s in self.state.slots))
        for past, _, shape, dtype, axis, baxis, _ in self.state.slots:
            if reuse and last is not None:
                feeds[past] = _feedable(last[1][past])
                continue
            full = list(shape)
            full[baxis], full[axis] = rows, longest
            padded = np.zeros(full, dtype=dtype)
            for row, (pos, cur) in enumerate(zip(poss, current, strict=True)):
                if pos and cur is not None:
                    padded[_at(len(full), baxis, slice(row, row + 1), axis, slice(0, pos))] = \
                        _host(cur.cache[past])
            feeds[past] = padded
        if self.state.mask is not None:
            name, dtype = self.state.mask
            mask = np.zeros((rows, longest + 1), dtype=dtype)
            for row, pos in enumerate(poss):
                mask[row, :pos] = 1
            mask[:, longest] = 1
            feeds[name] = mask
        if self.state.positions is not None:
            name, dtype = self.state.positions
            feeds[name] = np.asarray(poss, dtype=dtype)[:, np.newaxis]
        # on a GPU, packed caches stay there: this batch's next step reads them in place
        outputs, on_gpu = self._run(feeds, self.on_device and packed)
        outputs = self._last_position(outputs, greedy)
        held = {name: _OnHost(value) for name, value in on_gpu.items()}
        batch = next(_BATCHES)
        kept: dict[int, _Sequence] = {}
        for row, (seq, pos) in enumerate(zip(seqs, poss, strict=True)):
            cache: dict[str, Cached] = {}
            for past, present, _, dtype, axis, baxis, layout in self.state.slots:
                if present in held:
                    shape = held[present].value.shape()
                    index = _at(len(shape), baxis, slice(row, row + 1), axis, slice(0, pos + 1))
                    size = int(np.prod([1 if d == baxis else pos + 1 if d == axis else extent
                                        for d, extent in enumerate(shape)]))
                    cache[past] = _Rows(held[present], index, size * np.dtype(dtype).itemsize)
                    continue
                out = outputs[present]
                n = len(out.shape)
                if layout == "packed" or pos == longest:
                    cache[past] = out[_at(n, baxis, slice(row, row + 1), axis, slice(0, pos + 1))]
                else:  # the new token sits after the padding
                    own = out[_at(n, baxis, slice(row, row + 1), axis, slice(0, pos))]
                    new = out[_at(n, baxis, slice(row, row + 1), axis,
                                  slice(longest, longest + 1))]
                    cache[past] = np.concatenate([own, new], axis=axis)
            kept[seq] = _Sequence(pos + 1, cache, batch)
        self._store(kept)
        with self._lock:
            if packed:
                self._batches[batch] = (tuple(seqs), {
                    s[0]: on_gpu[s[1]] if s[1] in on_gpu else outputs[s[1]]
                    for s in self.state.slots})
            self._forget_batches()
        return {k: v for k, v in outputs.items() if k not in self._presents}

    def _run(self, feeds: dict[str, Any], on_device: bool
             ) -> tuple[dict[str, np.ndarray], dict[str, ort.OrtValue]]:
        """The shard's outputs as host arrays, but for the caches when `on_device`: those stay
        where the session made them."""
        if on_device:
            return self.runner.run_kept(feeds, self._presents)
        return self.runner.run(feeds), {}

    def _last_position(self, outputs: dict[str, np.ndarray],
                       greedy: bool) -> dict[str, np.ndarray]:
        """Only the last position's logits go on: the next token is picked from them, and a
        prompt's other positions would send a whole vocabulary each (7.5 MiB for a 40-token
        prompt of SmolLM2). A greedy step needs only the best token of each row: it goes
        alone, as `greedy_name(logits)` (the first of equal maxima, as numpy's argmax picks on
        the master), instead of 192 KiB of SmolLM2 logits per row."""
        name = self.state.logits
        if name is None or name not in outputs or outputs[name].ndim != 3:
            return outputs
        last = outputs.pop(name)[:, -1, :]
        if greedy:
            outputs[greedy_name(name)] = np.argmax(last, axis=-1).astype(np.int64)
        else:
            outputs[name] = np.ascontiguousarray(last[:, np.newaxis, :])
        return outputs

    def _forget_batches(self) -> None:
        """Drop the outputs of batched runs that no sequence's cache lives in any more
        (under the lock)."""
        held = {s.batch for s in self._seqs.values()}
        for batch in self._batches.keys() - held:
            del self._batches[batch]

    def _check_length(self, seq: int, pos: int, current: _Sequence | None) -> None:
        length = current.length if current is not None else 0
        if length != pos:
            raise RuntimeFailure(
                f"sequence {seq} holds {length} cached tokens here but the step says {pos}: "
                f"{CACHE_LOST} (a node restarted?); start the sequence again")

    def _store(self, kept: Mapping[int, _Sequence]) -> None:
        needed = sum(s.nbytes for s in kept.values())
        with self._lock:
            others = sum(s.nbytes for k, s in self._seqs.items() if k not in kept)
            if others + needed > self.budget_bytes:
                raise ClusterBusy(
                    f"busy: the KV cache budget ({self.budget_bytes / 2**20:.0f} MiB) is full "
                    f"with {len(self._seqs)} sequences; retry when one ends, or give the node "
                    "a larger --kv-budget")
            self._seqs.update(kept)


_BATCHES = itertools.count(1)


def _at(n: int, baxis: int, row: slice, axis: int, span: slice) -> tuple[slice, ...]:
    """An index of `n` axes taking `row` on the batch axis and `span` on the sequence axis."""
    index = [slice(None)] * n
    index[baxis], index[axis] = row, span
    return tuple(index)
