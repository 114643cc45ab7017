"""Generating text: tokenizer and chat template, sampling, and the prefill/decode loop.

The loop runs on the master. It needs one thing from where the model runs: `step(ids, seq,
pos)`, which feeds `ids` (the whole prompt at once for the prefill, then one token) to sequence
`seq` whose first `pos` tokens are cached, and returns the logits and the bytes each stage
sent on. `pipeline_step` makes that from a deployed `Pipeline` of stateful stages, batching
the decode steps of sequences that generate at once.

Sampling is greedy by default; temperature, top-k, top-p and a repetition penalty are applied in
that order, drawn from a seeded generator so that a seed repeats a run. Generation stops at an
end-of-sequence id, a stop string or the token limit.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from periphery_core.errors import PeripheryError
from periphery_core.generate.batching import PipelineSteps
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.generate.stateful import CACHE_LOST
from periphery_core.model.declared import read_json
from periphery_core.progress import CancelToken, check


class GenerationError(PeripheryError):
    """Generation cannot start or go on (no tokenizer, a prompt too long, a failed step)."""


Step = Callable[[np.ndarray, int, int], tuple[np.ndarray, tuple[int, ...]]]


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    prefill_chunk: int = 512  # a longer prompt is prefilled this many tokens a step

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError("--max-new-tokens must be at least 1")
        for bad, what in ((self.temperature < 0, f"temperature {self.temperature:g}: give 0 "
                           "(greedy) or more"),
                          (not 0 < self.top_p <= 1, f"top-p {self.top_p:g}: give more than 0 "
                           "and at most 1"),
                          (self.top_k < 0, f"top-k {self.top_k}: give 0 (off) or more"),
                          (self.repetition_penalty <= 0, f"repetition penalty "
                           f"{self.repetition_penalty:g}: give more than 0 (1 is off)")):
            if bad:
                raise GenerationError(f"sampling: {what}")


def pick(logits: np.ndarray, previous: Sequence[int], s: Sampling,
         rng: np.random.Generator) -> int:
    """The next token from one row of logits."""
    scores = logits.astype(np.float64, copy=True)
    if s.repetition_penalty != 1.0 and previous:
        seen = np.unique(np.asarray(previous))
        vals = scores[seen]
        scores[seen] = np.where(vals > 0, vals / s.repetition_penalty,
                                vals * s.repetition_penalty)
    if s.temperature == 0.0:
        return int(np.argmax(scores))
    scores = scores / s.temperature
    if s.top_k:
        kth = np.partition(scores, -s.top_k)[-s.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if s.top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < s.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


class TextCodec:
    """A model folder's tokenizer (`tokenizer.json`) and chat template."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise GenerationError(f"no tokenizer.json in {folder}: generation needs the "
                                  "model's tokenizer beside it")
        self.tokenizer = Tokenizer.from_file(str(path))
        config = read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.template: str | None = template if isinstance(template, str) else None
        self.specials = {k: str(config[k]) for k in ("bos_token", "eos_token")
                         if isinstance(config.get(k), str)}

    def eos_ids(self) -> tuple[int, ...]:
        token = self.specials.get("eos_token")
        found = self.tokenizer.token_to_id(token) if token else None
        return (found,) if found is not None else ()

    def prompt(self, user: str, system: str | None = None, chat: bool = True) -> str:
        """The text the model sees: the chat template applied, or the text as it is."""
        if not chat or self.template is None:
            return user if system is None else f"{system}\n{user}"
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        return self.chat(messages)

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """A conversation (role and content per message) as the model sees it, ready for the
        assistant's turn; without a chat template, the contents one a line."""
        if self.template is None:
            return "\n".join(m["content"] for m in messages)
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(self.template).render(
                messages=[dict(m) for m in messages], add_generation_prompt=True,
                **self.specials)
        except TemplateError as exc:  # a template's raise_exception, or one it cannot render
            raise GenerationError(f"the model's chat template refused the messages: "
                                  f"{exc}") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


@dataclass
class Generation:
    """A finished generation and its figures."""

    ids: list[int]
    text: str
    prompt_tokens: int
    finish: str  # "eos", "stop" or "length"
    ttft_s: float
    decode_s: float
    hop_bytes: list[tuple[int, ...]] = field(default_factory=list)  # per decode step
    rebuilt: int = 0  # times the caches were rebuilt after a lost node

    @property
    def new_tokens(self) -> int:
        return len(self.ids)

    @property
    def tokens_per_s(self) -> float:
        steps = max(0, len(self.ids) - 1)
        return steps / self.decode_s if self.decode_s > 0 and steps else 0.0

    @property
    def decode_bytes_per_token_per_hop(self) -> float:
        """Mean bytes that crossed one stage boundary per decoded token (0 with one stage)."""
        hops = [b[:-1] for b in self.hop_bytes if len(b) > 1]  # the last is the logits home
        if not hops:
            return 0.0
        return float(np.mean([np.mean(h) for h in hops]))


_SEQ_IDS = itertools.count(1)


def generate(step: Step, spec: DecoderSpec, prompt_ids: Sequence[int], sampling: Sampling,
             codec: TextCodec | None = None,
             on_text: Callable[[str], None] | None = None,
             release: Callable[[int], None] | None = None,
             cancel: CancelToken | None = None) -> Generation:
    """Prefill the prompt in one step, then decode one token a step until a stop; then
    `release(seq)` lets the stages free the sequence's caches.

    Raises:
        Cancelled: `cancel` was set (checked before every step).
        GenerationError: bad sampling options, an empty or too long prompt.
    """
    stepper = _Resilient(step, release)
    try:
        return _generate(stepper, spec, prompt_ids, sampling, codec, on_text, cancel)
    finally:
        stepper.release()


class _Resilient:
    """Steps of one sequence that survive a redeploy: when a stage says the sequence's cache
    was lost (a node was lost and the pipeline re-planned onto the survivors), the caches are
    rebuilt under a new sequence id by running the same steps again (every chunk of the
    prompt, then each token fed so far, one a step: the same arithmetic as before), and the
    step is retried."""

    def __init__(self, step: Step, release: Callable[[int], None] | None,
                 attempts: int = 3) -> None:
        self.inner, self._release, self.attempts = step, release, attempts
        self.seq = next(_SEQ_IDS)
        self.history: list[np.ndarray] = []  # the ids of every step that went through
        self.rebuilt = 0

    def __call__(self, ids: np.ndarray, pos: int,
                 greedy: bool = False) -> tuple[np.ndarray, tuple[int, ...]]:
        for attempt in range(self.attempts + 1):
            try:
                out = self._step(ids, self.seq, pos, greedy)
                break
            except PeripheryError as exc:
                if CACHE_LOST not in exc.message or attempt == self.attempts:
                    raise
                self._rebuild()
        self.history.append(ids)
        return out

    def _rebuild(self) -> None:
        self.release()
        self.seq = next(_SEQ_IDS)
        self.rebuilt += 1
        at = 0
        for ids in self.history:
            self._step(ids, self.seq, at, True)  # only the caches matter here
            at += int(ids.shape[1])

    def _step(self, ids: np.ndarray, seq: int, pos: int,
              greedy: bool) -> tuple[np.ndarray, tuple[int, ...]]:
        """A step; greedy (only the best token comes back) where the step offers it."""
        if greedy and getattr(self.inner, "picks_greedy", False):
            return self.inner(ids, seq, pos, greedy=True)  # type: ignore[call-arg]
        return self.inner(ids, seq, pos)

    def release(self) -> None:
        if self._release is not None:
            self._release(self.seq)


def _generate(stepper: _Resilient, spec: DecoderSpec, prompt_ids: Sequence[int],
              sampling: Sampling, codec: TextCodec | None,
              on_text: Callable[[str], None] | None,
              cancel: CancelToken | None = None) -> Generation:
    check_request(spec, prompt_ids, sampling)
    rng = np.random.default_rng(sampling.seed)
    eos = set(spec.eos_ids) | set(codec.eos_ids() if codec else ())
    prompt = np.asarray([list(prompt_ids)], dtype=spec.ids_dtype)
    out: list[int] = []
    shown = ""
    hop_bytes: list[tuple[int, ...]] = []
    t0 = time.perf_counter()
    ttft = 0.0
    finish = "length"
    pos = 0
    chunk = max(1, sampling.prefill_chunk)
    # Greedy picking needs only each step's best token, which a pipeline can send instead of
    # the logits (`PipelineSteps.picks_greedy`); a chunk of a long prompt needs nothing back.
    greedy = sampling.temperature == 0.0 and sampling.repetition_penalty == 1.0
    while prompt.shape[1] - pos > chunk:  # a long prompt goes in chunks: bounded activations
        check(cancel)
        stepper(prompt[:, pos:pos + chunk], pos, greedy=True)
        pos += chunk
    ids = prompt[:, pos:]
    while len(out) < sampling.max_new_tokens:
        check(cancel)
        logits, sent = stepper(ids, pos, greedy)
        if out:
            hop_bytes.append(sent)
        pos += ids.shape[1]
        token = pick(logits[0, -1], [*prompt_ids, *out], sampling, rng)
        if not out:
            ttft = time.perf_counter() - t0
        if token in eos:
            finish = "eos"
            break
        out.append(token)
        if codec is not None:
            text = codec.decode(out)
            if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
            if any(s in text for s in sampling.stop):
                finish = "stop"
                break
        ids = np.asarray([[token]], dtype=spec.ids_dtype)
    decode_s = time.perf_counter() - t0 - ttft
    text = codec.decode(out) if codec is not None else ""
    for s in sampling.stop:
        if s in text:
            text = text[:text.index(s)]
    if on_text is not None and codec is not None and len(text) > len(shown) \
            and text.startswith(shown):
        on_text(text[len(shown):])
    return Generation(out, text, len(prompt_ids), finish, ttft, decode_s, hop_bytes,
                      stepper.rebuilt)


def check_request(spec: DecoderSpec, prompt_ids: Sequence[int], sampling: Sampling,
                  limit: str = "--max-new-tokens") -> None:
    """Refuse what cannot run, in one line: bad sampling options, an empty prompt, or one that
    with its `limit` of new tokens outgrows the model's context."""
    sampling.check()
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    if spec.context and len(prompt_ids) + sampling.max_new_tokens > spec.context:
        raise GenerationError(f"the prompt ({len(prompt_ids)} tokens) and {limit} "
                              f"({sampling.max_new_tokens}) exceed the model's context of "
                              f"{spec.context} tokens")


def pipeline_step(pipeline: Any, spec: DecoderSpec, timeout: float = 120.0,
                  batch: bool = True) -> PipelineSteps:
    """`step` over a deployed pipeline of stateful stages (`Pipeline(decoder=spec)`); its
    `release` is the `release` to give `generate`. Concurrent sequences' decode steps are
    batched (generate.batching)."""
    return PipelineSteps(pipeline, spec, batch=batch, timeout=timeout)


def whole_model_step(loaded: Any, spec: DecoderSpec, exact: bool = False,
                     threads: int = 0) -> Step:
    """`step` over the unsplit model in this process, caches kept here: the baseline a split
    run is compared with (plain ONNX Runtime on the same cores)."""
    from periphery_core.runtime.session import SessionConfig, make_session, run_session

    source = loaded.path if loaded.has_external_data else loaded.proto
    session = make_session(source, SessionConfig(exact=exact, threads=threads))
    names = [o.name for o in session.get_outputs()]
    caches: dict[int, dict[str, np.ndarray]] = {}

    def step(ids: np.ndarray, seq: int, pos: int) -> tuple[np.ndarray, tuple[int, ...]]:
        cache = caches.get(seq) if pos else None
        feeds: dict[str, np.ndarray] = {spec.input_ids: ids}
        for slot in spec.slots:
            feeds[slot.past] = cache[slot.past] if cache is not None \
                else np.zeros(slot.empty_shape, dtype=slot.dtype)
        new = int(ids.shape[1])
        if spec.mask:
            feeds[spec.mask] = np.ones((1, pos + new), dtype=spec.mask_dtype)
        if spec.positions:
            feeds[spec.positions] = np.arange(pos, pos + new, dtype=spec.positions_dtype)[None]
        out = dict(zip(names, run_session(session, feeds, names), strict=True))
        caches[seq] = {s.past: out[s.present] for s in spec.slots}
        return out[spec.logits], ()

    return step
