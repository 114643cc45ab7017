"""`text:FILE`: one sentence per line, tokenized with a Hugging Face `tokenizers` tokenizer.

Text is the one source that does not stack samples: a text batch is padded to its longest
sentence, as a tokenizer does for a real batch. `TextEncoder` also serves `stsb`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from periphery_core.errors import DataError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.options import int_param
from periphery_core.quantize.sources.samples import Feeds, check_batch_size

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TextEncoder:
    """Sentences to the model's token inputs with a Hugging Face `tokenizers` tokenizer."""

    def __init__(self, tokenizer: Any, inputs: Sequence[InputSpec], max_length: int,
                 pad_to_max: bool) -> None:
        names = [s.name for s in inputs]
        unknown = [n for n in names if n not in TEXT_INPUTS]
        if unknown or "input_ids" not in names:
            raise DataError(f"text data fills inputs named {', '.join(TEXT_INPUTS)}; this "
                            f"model's inputs are {', '.join(names)}")
        for s in inputs:
            if s.dtype.kind not in "iu" or len(s.shape) != 2:
                raise DataError(f"text: input '{s.name}' is {s.dtype} {list(s.shape)}; token "
                                "inputs must be integer [batch, sequence]")
        self.inputs = tuple(inputs)
        padding = tokenizer.padding or {}
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(
            pad_id=padding.get("pad_id", 0), pad_type_id=padding.get("pad_type_id", 0),
            pad_token=padding.get("pad_token", "[PAD]"),
            length=max_length if pad_to_max else None)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, sentences: Sequence[str]) -> Feeds:
        encodings = self.tokenizer.encode_batch(list(sentences))
        fields = {"input_ids": "ids", "attention_mask": "attention_mask",
                  "token_type_ids": "type_ids"}
        return {s.name: np.array([getattr(e, fields[s.name]) for e in encodings], dtype=s.dtype)
                for s in self.inputs}


def text_encoder(spec: str, path: str, inputs: Sequence[InputSpec],
                  params: dict[str, str]) -> TextEncoder:
    """The encoder a text spec asks for: its `tokenizer=` file, `max_length=` and `padding=`."""
    if "tokenizer" not in params:
        raise DataError(f"'{spec}' needs a tokenizer: add ?tokenizer=PATH/tokenizer.json")
    given = Path(params["tokenizer"]).expanduser()
    candidates = [given] if given.is_absolute() else [Path(path).parent / given, given]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise DataError(f"tokenizer file not found: {given} (looked beside {path} and in the "
                        "current folder)")
    padding = params.get("padding", "longest").lower()
    if padding not in ("longest", "max_length"):
        raise DataError(f"'{spec}': padding={padding} is neither longest nor max_length")
    max_length = int_param(spec, params, "max_length", 128)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("text data needs the tokenizers package: pip install tokenizers") \
            from None
    try:
        tokenizer = Tokenizer.from_file(str(found))
    except Exception:  # tokenizers raises a bare Exception for a bad file
        raise DataError(f"{found} is not a Hugging Face tokenizer.json") from None
    return TextEncoder(tokenizer, inputs, max_length, padding == "max_length")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class TextSource:
    """One sentence per line (blank lines skipped), tokenized; each batch padded to its longest."""

    def __init__(self, path: Path, inputs: Sequence[InputSpec], encoder: TextEncoder,
                 samples: int | None = None) -> None:
        sentences = _read_lines(path)
        if not sentences:
            raise DataError(f"{path} holds no sentences")
        self.sentences = sentences[:samples] if samples is not None else sentences
        self.encoder = encoder
        self.description = f"{len(self.sentences)} sentences from {path.name}"

    def __len__(self) -> int:
        return len(self.sentences)

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        check_batch_size(batch_size)
        for start in range(0, len(self.sentences), batch_size):
            yield self.encoder.encode(self.sentences[start:start + batch_size])

    def labels(self) -> np.ndarray | None:
        return None
