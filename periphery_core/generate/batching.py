"""Steps of many sequences over a deployed pipeline, their decode steps batched.

`PipelineSteps` is the `Step` that `generate` takes when the model runs on the cluster. A
prefill goes down the pipeline on its own. A decode step waits for a dispatcher thread that
sends the waiting steps of several sequences as one batched step: every stage runs them in one
run (`StatefulStage.run_batch`), which on a CPU costs little more than one of them.

How the batches form:
- at most `depth` batches are in flight, one per stage, so every stage has work and none
  waits for a batch to come back while others queue;
- a batch takes at most its share of the sequences decoding (all of them over the stages), so
  that the stages' batches stay even;
- sequences whose last step just came back are waited for a moment (`grace_s`: they are
  picking their next token), so a batch that came back together leaves together instead of
  one step at a time;
- with replicas, a batch holds the sequences of one replica (the master keeps each sequence
  on the replica whose stages hold its caches), and each replica has its own `depth`.

Only models whose steps can share a run (`DecoderSpec.batchable`) are batched; for others, and
with `batch=False`, every step goes on its own.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from periphery_core.generate.decoder import DecoderSpec
from periphery_core.generate.stateful import greedy_name
from periphery_core.wire.protocol import MAX_BATCH

IDLE_S = 0.1


@dataclass
class _Waiting:
    ids: np.ndarray
    seq: int
    pos: int
    greedy: bool
    since: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class PipelineSteps:
    """The `Step` of a deployed pipeline of stateful stages (`Pipeline(decoder=spec)`).

    Args:
        pipeline: the deployed pipeline.
        spec: the decoder it runs.
        batch: batch concurrent sequences' decode steps (when the model allows it).
        max_batch: the most sequences in one batched step.
        grace_s: how long a dispatch waits for sequences whose last step just came back.
        timeout: how long one step may take before it fails.
    """

    def __init__(self, pipeline: Any, spec: DecoderSpec, *, batch: bool = True,
                 max_batch: int = 32, grace_s: float = 0.01, timeout: float = 120.0) -> None:
        self.pipeline = pipeline
        self.spec = spec
        self.batching = batch and spec.batchable
        self.max_batch = max(1, min(max_batch, MAX_BATCH))
        self.grace_s = grace_s
        self.timeout = timeout
        self.batches = 0  # batched steps sent, and the rows they carried (figures)
        self.rows = 0
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        # sequences decoding through the dispatcher, and when each last asked for a step or got
        # one back (one that ends without `release` is forgotten `IDLE_S` after that)
        self._active: dict[int, float] = {}
        # each batch in flight: its replica (-1: not known yet) and sequences
        self._inflight: list[tuple[int, set[int]]] = []
        self._closed = False
        self._thread: threading.Thread | None = None

    # `generate` may ask for greedy steps: the last stage then sends each row's best token
    # instead of its logits (see `_rows`).
    picks_greedy = True

    def __call__(self, ids: np.ndarray, seq: int, pos: int,
                 greedy: bool = False) -> tuple[np.ndarray, tuple[int, ...]]:
        if not self.batching or ids.shape[0] != 1 or ids.shape[1] != 1:
            step: dict[str, Any] = {"seq": seq, "pos": pos, "new": int(ids.shape[1])}
            if greedy:
                step["greedy"] = True
            future = self.pipeline.submit({self.spec.input_ids: ids}, step)
            outputs = future.result(timeout=self.timeout)
            return self._rows(outputs)[0], tuple(getattr(future, "stage_bytes", ()))
        waiting = _Waiting(ids, seq, pos, greedy)
        with self._cond:
            if self._closed:
                raise RuntimeError("the pipeline's steps were closed")
            self._active[seq] = waiting.since
            self._waiting.append(waiting)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch_loop, daemon=True,
                                                name="decode-batches")
                self._thread.start()
        self._dispatch_now()
        return waiting.future.result(timeout=self.timeout)

    def release(self, seq: int) -> None:
        """Sequence `seq` ended: the stages free its caches, and no batch waits for it."""
        with self._cond:
            self._active.pop(seq, None)
            self._cond.notify_all()
        self.pipeline.master.release_sequences([seq])

    @property
    def mean_batch(self) -> float:
        """Rows per batched step so far (0 before the first)."""
        return self.rows / self.batches if self.batches else 0.0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ dispatch

    def _depth(self) -> int:
        plan = getattr(self.pipeline, "plan", None)
        return max(1, len(plan.stages)) if plan is not None else 1

    def _replicas(self, seqs: set[int]) -> dict[int, int]:
        """The replica holding each sequence's caches (-1: none yet; the master picks one),
        asked once per sequence; with one replica, it holds them all."""
        plan = getattr(self.pipeline, "plan", None)
        if plan is None or plan.replicas == 1:
            return dict.fromkeys(seqs, 0)
        replica_of = self.pipeline.master.replica_of
        return {s: -1 if (r := replica_of(s)) is None else r for s in seqs}

    def _take(self) -> tuple[list[_Waiting] | None, float | None]:
        """The next batch to send, or None and how long to wait (None: until woken).

        With replicas, a batch holds sequences of one replica (their caches live on its
        stages), and each replica has at most `depth` batches in flight."""
        if not self._waiting:
            return None, None
        depth = self._depth()
        busy = {w.seq for w in self._waiting}.union(*(rows for _, rows in self._inflight))
        now = time.perf_counter()
        for seq in [s for s, t in self._active.items() if s not in busy and now - t > IDLE_S]:
            del self._active[seq]
        where = self._replicas({w.seq for w in self._waiting} | self._active.keys())
        groups: dict[int, list[_Waiting]] = {}
        for w in self._waiting:
            groups.setdefault(where[w.seq], []).append(w)
        wait: float | None = None
        for replica, waiting in sorted(groups.items()):
            if sum(1 for r, _ in self._inflight if r == replica) >= depth:
                continue
            active = [s for s in self._active if where[s] == replica]
            if set(active) - busy:  # some just got their step back and will soon be here
                left = self.grace_s - (now - min(w.since for w in waiting))
                if left > 0:
                    wait = left if wait is None else min(wait, left)
                    continue
            size = min(self.max_batch, max(1, math.ceil(len(active) / depth)))
            # In sequence order: the same sequences come back as the same batch, in the same
            # rows, and a stage then runs on its last outputs without copying a cache
            # (StatefulStage.run_batch).
            take = sorted(waiting, key=lambda w: w.seq)[:size]
            rows = {w.seq for w in take}  # a sequence waits for one step at a time
            self._waiting = [w for w in self._waiting if w.seq not in rows]
            self._inflight.append((replica, rows))
            return take, None
        return None, wait

    def _dispatch_now(self) -> None:
        """Send the next batch from the calling thread if one is ready now: the sequence that
        completes a batch sends it without waking the dispatcher (a thread wake-up costs
        about as much as a hop on a loaded host). The dispatcher sends what must wait."""
        with self._cond:
            take, _ = (None, None) if self._closed else self._take()
            if take is None:
                self._cond.notify_all()
                return
            entry = self._inflight[-1]
        self._send(take, entry)

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        for w in self._waiting:
                            w.future.set_exception(RuntimeError("the pipeline's steps closed"))
                        self._waiting.clear()
                        return
                    take, wait = self._take()
                    if take is not None:
                        break
                    self._cond.wait(wait)
                entry = self._inflight[-1]
            self._send(take, entry)

    def _send(self, take: list[_Waiting], entry: tuple[int, set[int]]) -> None:
        try:
            ids = np.concatenate([w.ids for w in take], axis=0)
            step: dict[str, Any] = {"seqs": [w.seq for w in take],
                                    "poss": [w.pos for w in take]}
            if all(w.greedy for w in take):
                step["greedy"] = True
            future = self.pipeline.submit({self.spec.input_ids: ids}, step)
        except Exception as exc:
            self._finish(take, entry, None, exc)
            return
        self.batches += 1
        self.rows += len(take)
        future.add_done_callback(lambda f: self._finish(take, entry, f, f.exception()))

    def _finish(self, take: list[_Waiting], entry: tuple[int, set[int]],
                future: Future | None, error: BaseException | None) -> None:
        with self._cond:
            self._inflight = [e for e in self._inflight if e is not entry]
            now = time.perf_counter()
            for seq in entry[1]:  # thinking from now on: `IDLE_S` counts from here
                if seq in self._active:
                    self._active[seq] = now
            self._cond.notify_all()
        if error is not None or future is None:
            for w in take:
                w.future.set_exception(error or RuntimeError("the batch was not sent"))
            return
        logits = self._rows(future.result())
        sent = tuple(getattr(future, "stage_bytes", ()))
        per_row = tuple(round(b / len(take)) for b in sent)
        for row, w in zip(logits, take, strict=True):
            w.future.set_result((row, per_row))

    def _rows(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Each row's logits of the last position, [1, 1, vocabulary]. A greedy step brought
        back only each row's best token: its row is a stand-in whose argmax is that token
        (every other entry -inf), which `pick` reads as the logits it would have chosen it
        from."""
        best = outputs.get(greedy_name(self.spec.logits))
        if best is None:
            logits = outputs[self.spec.logits]
            return [logits[r:r + 1] for r in range(logits.shape[0])]
        rows = []
        for token in np.asarray(best).reshape(-1):
            row = np.full((1, 1, int(token) + 1), -np.inf, dtype=np.float32)
            row[0, 0, -1] = 0.0
            rows.append(row)
        return rows
