"""Recognising a decoder language model: which inputs are its KV cache, and how to feed it.

Three layouts are recognised, by the names of the graph's inputs and outputs:

- ONNX Runtime GenAI folders: names from `genai_config.json` (`past_key_values.%d.key` ->
  `present.%d.key` by default), end-of-sequence ids from it too;
- Hugging Face / optimum exports: `past_key_values.N.key/value` -> `present.N.key/value`, with
  `position_ids` where present, ids from `config.json` / `generation_config.json`;
- GPT-2 style stacked caches: `past_N` -> `present_N`.

`DecoderSpec` names the cache pairs, the token input, the logits, the inputs each stage can
make for itself (the attention mask and the positions, from the sequence's length) and the
empty cache of each layer (batch 1, length 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from periphery_core.model.declared import GENAI_CONFIG, HF_CONFIG, read_json
from periphery_core.model.loading import LoadedModel
from periphery_core.model.shapes import graph_inputs, resolve_input_shapes

# A language model's stages are planned to hold the caches of this many sequences at once.
PLANNED_SEQUENCES = 4


@dataclass(frozen=True)
class CacheSlot:
    """One KV-cache tensor of one layer: fed as `past`, returned as `present`."""

    past: str
    present: str
    empty_shape: tuple[int, ...]  # batch 1, length 0
    dtype: str
    axis: int  # the sequence axis
    batch_axis: int = 0
    # Where a step writes its new tokens when sequences of different lengths share a batch
    # (their pasts padded to the longest): "packed" right after each sequence's own tokens
    # (GroupQueryAttention, which reads each row's length from the attention mask), or
    # "appended" after the padded past (attention that concatenates past and new).
    layout: str = "appended"

    def nbytes_per_token(self) -> int:
        per = int(np.prod([d for i, d in enumerate(self.empty_shape) if i != self.axis]))
        return per * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class DecoderSpec:
    """How to drive a decoder LLM one step at a time."""

    format: str  # "onnxruntime-genai", "hugging-face" or "gpt-2 stacked cache"
    input_ids: str
    ids_dtype: str
    logits: str
    slots: tuple[CacheSlot, ...]
    mask: str | None  # attention mask input, made from the sequence length
    mask_dtype: str
    positions: str | None  # position ids input, made from the sequence length
    positions_dtype: str
    eos_ids: tuple[int, ...]
    context: int  # the longest sequence the model was made for (0: unknown)
    folder: Path  # where the tokenizer and chat template are looked for

    @property
    def batchable(self) -> bool:
        """Decode steps of sequences of different lengths can share one run: the pasts are
        padded to the longest and the attention mask hides the padding, which needs the mask,
        and positions that do not come from the (padded) past length: either given as an input,
        or, with GroupQueryAttention, taken from the mask."""
        return self.mask is not None and (
            self.positions is not None or all(s.layout == "packed" for s in self.slots))

    @property
    def layers(self) -> int:
        return len({re.sub(r"\D", "", s.past) or s.past for s in self.slots})

    def cache_bytes_per_token(self) -> int:
        return sum(s.nbytes_per_token() for s in self.slots)

    def state_bytes(self, context: int, sequences: int) -> dict[str, tuple[str, int]]:
        """Per cache input: its output and the bytes it holds at `context` tokens for
        `sequences` sequences (what the planner counts against a stage's memory)."""
        return {s.past: (s.present, s.nbytes_per_token() * context * sequences)
                for s in self.slots}

    def planned_state(self) -> dict[str, tuple[str, int]]:
        """`state_bytes` at what the planner sizes caches for: the model's context (at most
        4,096 tokens) for `PLANNED_SEQUENCES` sequences at once."""
        return self.state_bytes(min(self.context or 2048, 4096), PLANNED_SEQUENCES)

    def describe(self) -> str:
        first = self.slots[0]
        heads = first.empty_shape[first.axis - 1] if first.axis >= 1 else 0
        return (f"{self.format} decoder, {self.layers} layers, {heads} KV heads of "
                f"{first.empty_shape[-1]}, KV cache {self.cache_bytes_per_token() / 1024:.1f} "
                "KiB per token" + (f", context {self.context}" if self.context else ""))


_PATTERNS = (
    ("hugging-face", re.compile(r"^past_key_values\.(\d+)\.(key|value)$"),
     "present.{0}.{1}"),
    ("gpt-2 stacked cache", re.compile(r"^past_(\d+)$"), "present_{0}"),
)


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def _dim_param(vi: Any, axis: int) -> str:
    dims = vi.type.tensor_type.shape.dim
    return str(dims[axis].dim_param) if axis < len(dims) else ""


def recognize(loaded: LoadedModel) -> DecoderSpec | None:
    """The model's decoder layout, or None if it is not a decoder with a KV cache."""
    proto = loaded.proto
    folder = loaded.path.parent
    inputs = {vi.name: vi for vi in graph_inputs(proto)}
    outputs = {o.name for o in proto.graph.output}
    genai = read_json(folder / GENAI_CONFIG).get("model", {})
    decoder = genai.get("decoder", {}) if isinstance(genai, dict) else {}
    pairs: list[tuple[str, str]] = []
    fmt = ""
    if isinstance(decoder, dict) and decoder.get("inputs"):
        names_in, names_out = decoder.get("inputs", {}), decoder.get("outputs", {})
        for kind in ("key", "value"):
            pin = str(names_in.get(f"past_{kind}_names", ""))
            pout = str(names_out.get(f"present_{kind}_names", ""))
            for layer in range(int(decoder.get("num_hidden_layers", 0) or 0)):
                if pin % layer in inputs and pout % layer in outputs:
                    pairs.append((pin % layer, pout % layer))
        fmt = "onnxruntime-genai"
    if not pairs:
        for name, pattern, present in _PATTERNS:
            found = [(n, present.format(*m.groups())) for n in inputs
                     if (m := pattern.match(n))]
            found = [(p, q) for p, q in found if q in outputs]
            if found:
                pairs, fmt = found, name
                break
    ids_name = str(decoder.get("inputs", {}).get("input_ids", "input_ids")) if decoder \
        else "input_ids"
    logits = str(decoder.get("outputs", {}).get("logits", "logits")) if decoder else "logits"
    if not pairs or ids_name not in inputs or logits not in outputs:
        return None
    specs, _ = resolve_input_shapes(loaded)  # batch 1, caches of length 0
    shapes = {s.name: s for s in specs}
    batch = _dim_param(inputs[ids_name], 0)
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    slots = []
    for past, present in pairs:
        spec = shapes[past]
        zero = [i for i, d in enumerate(spec.shape) if d == 0]
        if len(zero) != 1:
            return None
        axes = [i for i in range(len(spec.shape))
                if batch and _dim_param(inputs[past], i) == batch]
        layout = "packed" if producers.get(present) == "GroupQueryAttention" else "appended"
        slots.append(CacheSlot(past, present, spec.shape, spec.dtype.name, zero[0],
                               axes[0] if len(axes) == 1 else 0, layout))
    mask = "attention_mask" if "attention_mask" in inputs else None
    positions = "position_ids" if "position_ids" in inputs else None
    hf = read_json(folder / HF_CONFIG)
    eos = _ids(genai.get("eos_token_id")) if isinstance(genai, dict) else ()
    eos = eos or _ids(read_json(folder / "generation_config.json").get("eos_token_id")) \
        or _ids(hf.get("eos_token_id"))
    context = int(genai.get("context_length", 0) or 0) if isinstance(genai, dict) else 0
    context = context or int(hf.get("max_position_embeddings", 0) or 0)
    return DecoderSpec(
        format=fmt, input_ids=ids_name, ids_dtype=shapes[ids_name].dtype.name, logits=logits,
        slots=tuple(slots), mask=mask,
        mask_dtype=shapes[mask].dtype.name if mask else "int64",
        positions=positions,
        positions_dtype=shapes[positions].dtype.name if positions else "int64",
        eos_ids=eos, context=context, folder=folder,
    )
