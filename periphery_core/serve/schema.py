"""The request bodies `periphery serve` takes, as the OpenAI API defines them (validated by
pydantic, never parsed by hand), and how each becomes `Sampling`.

Fields clients send that change nothing here (`logprobs`, `user`, `presence_penalty`, ...) are
accepted and ignored; fields whose value we cannot honour (`n` above 1) are refused. Two
extensions that llama.cpp's and vLLM's servers take too: `top_k` and `repetition_penalty`.
Without `temperature` decoding is greedy (the OpenAI API's default is 1.0; we keep the CLI's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from periphery_core.generate.engine import Sampling

MAX_MESSAGES = 1024
MAX_TEXT = 1 << 20  # characters in one message or prompt
DEFAULT_MAX_TOKENS = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1 << 20)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 16 non-empty texts of at most 256 characters")
        return value

    def sampling(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return Sampling(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=self.temperature or 0.0,
            top_k=self.top_k or 0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed or 0,
            stop=tuple(stops),
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] = Field(max_length=MAX_TEXT)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; templates know only the older one
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionRequest(_Body):
    prompt: str | list[str] = Field(max_length=MAX_TEXT)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("prompt: one text (a list of one is taken too)")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# What each object of a body looks like, for the line that says one is not an object (pydantic
# would name our classes: "a valid dictionary or instance of _Tensor").
EXAMPLES = {
    "ChatRequest": '{"messages": [{"role": "user", "content": "..."}]}',
    "CompletionRequest": '{"prompt": "..."}',
    "Message": '{"role": "user", "content": "..."}',
    "TextPart": '{"type": "text", "text": "..."}',
}


def first_error(exc: ValidationError, examples: Mapping[str, str] = EXAMPLES) -> str:
    """One line: where the body is wrong and how."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    example = examples.get(str((err.get("ctx") or {}).get("class_name")))
    if err.get("type") == "model_type" and example is not None:
        return f"{where}: should be an object like {example}"
    return f"{where}: {err.get('msg', 'invalid')}"
