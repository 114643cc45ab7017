"""A language model deployed on the cluster, taking requests: what `periphery serve` runs.

`TextService` holds what every request shares: the deployed pipeline, its steps (concurrent
sequences' decode steps batched, generate.batching), the tokenizer and chat template, and a
limit on the sequences generating at once. A request takes a slot (`take_slot`, which refuses with
`ClusterBusy` when all are taken), generates, and gives the slot back; its caches are freed on
the nodes when it ends, however it ends (finished, cancelled because its client went away, or
failed). Figures for /metrics are kept here too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from periphery_core.errors import ClusterBusy, PeripheryError
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.generate.engine import (
    Generation,
    Sampling,
    TextCodec,
    check_request,
    generate,
    pipeline_step,
)
from periphery_core.progress import CancelToken


@dataclass
class ServiceFigures:
    """Counters since the service started (read by /metrics)."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)  # the latest, at most 1,000
    tokens_per_s: list[float] = field(default_factory=list)


class Slots:
    """At most `max_concurrent` requests at once; one more is refused, never queued."""

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise PeripheryError("--max-concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self.rejected = 0
        self._slots_lock = threading.Lock()
        self._active = 0

    @property
    def in_flight(self) -> int:
        with self._slots_lock:
            return self._active

    def take_slot(self) -> None:
        """A slot for one request; `give_back` returns it.

        Raises:
            ClusterBusy: `max_concurrent` requests are running already.
        """
        with self._slots_lock:
            if self._active >= self.max_concurrent:
                self.rejected += 1
                raise ClusterBusy(f"busy: {self._active} requests are running, the most this "
                                  f"server takes at once (--max-concurrent "
                                  f"{self.max_concurrent}); retry when one ends")
            self._active += 1

    def give_back(self) -> None:
        with self._slots_lock:
            self._active -= 1



class TextService(Slots):
    """Generation requests over a deployed `Pipeline(decoder=spec)`.

    Args:
        pipeline: the deployed pipeline.
        spec: its decoder.
        name: the model's name as clients see it.
        max_concurrent: sequences generating at once; one more is refused.
    """

    routes = "OpenAI API"  # what an endpoint of it answers, in a word

    def __init__(self, pipeline: Any, spec: DecoderSpec, name: str,
                 max_concurrent: int = 8) -> None:
        super().__init__(max_concurrent)
        self.pipeline = pipeline
        self.spec = spec
        self.name = name
        self.codec = TextCodec(spec.folder)
        self.steps = pipeline_step(pipeline, spec)
        self.figures = ServiceFigures()
        self._lock = threading.Lock()

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """A conversation's prompt tokens, the chat template applied."""
        return self.codec.encode(self.codec.chat(messages))

    def text_ids(self, prompt: str) -> list[int]:
        return self.codec.encode(prompt)

    def check(self, prompt_ids: Sequence[int], sampling: Sampling) -> None:
        """Refuse a request that cannot run, before anything is sent (one line, why)."""
        check_request(self.spec, prompt_ids, sampling, limit="max_tokens")

    def generate(self, prompt_ids: Sequence[int], sampling: Sampling,
                 on_text: Callable[[str], None] | None = None,
                 cancel: CancelToken | None = None) -> Generation:
        """Generate one sequence (holding a slot); its caches are freed when it ends."""
        with self._lock:
            self.figures.started += 1
        try:
            result = generate(self.steps, self.spec, prompt_ids, sampling, self.codec,
                              on_text=on_text, release=self.steps.release, cancel=cancel)
        except Exception:
            with self._lock:
                if cancel is not None and cancel.cancelled:
                    self.figures.cancelled += 1
                else:
                    self.figures.failed += 1
            raise
        with self._lock:
            f = self.figures
            f.finished += 1
            f.prompt_tokens += result.prompt_tokens
            f.new_tokens += result.new_tokens
            f.ttft_s = [*f.ttft_s[-999:], result.ttft_s]
            if result.tokens_per_s:
                f.tokens_per_s = [*f.tokens_per_s[-999:], result.tokens_per_s]
        return result

    def close(self) -> None:
        self.steps.close()
