"""The Chat screen: talk to a decoder LLM deployed on the cluster, tokens streaming in.

A decoder LLM (recognised when it is opened) is planned and deployed like any model, its stages
keeping their own KV caches; this screen renders the prompt with the model's chat template,
generates in a thread worker through the cluster control's pipeline and streams the text as it
comes, with time to first token, tokens/s, bytes per token per hop and each stage's time per token.
Escape stops a generation.
"""

from __future__ import annotations

import statistics
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Footer, Input, Static

from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_core.cluster import events as ev
from periphery_core.errors import Cancelled
from periphery_core.generate.engine import (
    Generation,
    Sampling,
    TextCodec,
    generate,
    pipeline_step,
)
from periphery_core.progress import CancelToken

HINT = ("Open a language model folder (an ONNX Runtime GenAI or Hugging Face export with its "
        "tokenizer) on the Model screen (1), plan and deploy it on the Shards screen (3), then "
        "type here. Or: periphery-app --demo MODEL_FOLDER --nodes 2")


class ChatScreen(PeripheryScreen):
    """Prompt in, streamed text out, with the figures of each reply."""

    MODE = "chat"
    LABEL = "Chat"
    CSS_PATH = "chat.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop generating", show=True),
        Binding("ctrl+n", "new_chat", "New chat", show=True),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.transcript: list[tuple[str, str]] = []  # (who, text), the reply growing last
        self.last: Generation | None = None
        self.generating = False
        self._cancel: CancelToken | None = None
        self.max_new_tokens = 256

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        with VerticalScroll(id="conversation"):
            yield Static(HINT, id="transcript")
        yield Static("", id="figures")
        yield Input(placeholder="Ask something and press enter", id="prompt")
        yield Footer()

    def on_screen_resume(self) -> None:
        if self._ready() is None:  # (else the keys 1-7 would be typed into it)
            self.query_one("#prompt", Input).focus()
        self._draw()

    def _ready(self) -> str | None:
        """Why the screen cannot generate now, or None."""
        opened = self.papp.opened
        if opened is None:
            return "no model is open. " + HINT
        if opened.decoder is None:
            return (f"{opened.loaded.name} is not a language model Periphery recognises (no KV "
                    "cache inputs). " + HINT)
        pipeline = self.papp.control.pipeline
        if pipeline is None or not pipeline.deployed or pipeline.loaded is not opened.loaded:
            return "the model is not deployed yet: plan and deploy it on the Shards screen (3)."
        return None

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.generating:
            return
        why = self._ready()
        if why is not None:
            self.query_one("#figures", Static).update(f"[b]Cannot chat:[/] {why}")
            return
        event.input.value = ""
        messages = conversation([*self.transcript, ("you", text)])  # earlier turns too
        self.transcript += [("you", text), ("model", "")]
        self.generating = True
        self.refresh_bindings()
        self._cancel = CancelToken()
        self._draw()
        self._generate(messages, self._cancel)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`Stop generating` is offered, and takes escape, only while a reply is being
        generated; otherwise escape goes back, as on every screen."""
        if action == "new_chat":
            return bool(self.transcript) and not self.generating
        return self.generating if action == "stop" else True

    def action_new_chat(self) -> None:
        """Start over: the next prompt is the first of a new conversation."""
        self.transcript, self.last = [], None
        self.query_one("#figures", Static).update("")
        self.refresh_bindings()
        self._draw()

    def action_stop(self) -> None:
        """Stop the reply being generated."""
        if self._cancel is not None:
            self._cancel.cancel()

    @work(thread=True, exclusive=True, group="chat")
    def _generate(self, messages: list[dict[str, str]], cancel: CancelToken) -> None:
        opened = self.papp.opened
        control = self.papp.control
        pipeline = control.pipeline
        assert opened is not None and opened.decoder is not None and pipeline is not None
        spec = opened.decoder
        per_stage: dict[int, list[float]] = {}

        def on_event(e: ev.Event) -> None:
            if isinstance(e, ev.RequestCompleted):
                for t in e.stages:
                    per_stage.setdefault(t.stage, []).append(t.compute_s)

        unsubscribe = control.master().bus.subscribe(on_event)
        step = pipeline_step(pipeline, spec)
        try:
            codec = TextCodec(spec.folder)
            ids = codec.encode(codec.chat(messages))
            result = generate(
                step, spec, ids, Sampling(max_new_tokens=self.max_new_tokens), codec,
                on_text=lambda piece: self.app.call_from_thread(self._append, piece),
                release=step.release, cancel=cancel)
        except Cancelled:
            self.app.call_from_thread(self._finish, None, {}, "stopped")
            return
        except Exception as exc:
            self.app.call_from_thread(self._finish, None, {}, "failed")
            self.report_failure(exc)
            return
        finally:
            step.close()
            unsubscribe()
        stages = {s: statistics.median(v) for s, v in sorted(per_stage.items()) if v}
        self.app.call_from_thread(self._finish, result, stages, result.finish)

    def _append(self, piece: str) -> None:
        who, text = self.transcript[-1]
        self.transcript[-1] = (who, text + piece)
        self._draw()

    def _finish(self, result: Generation | None, stages: dict[int, float], why: str) -> None:
        self.generating = False
        self.refresh_bindings()
        self._cancel = None
        figures = self.query_one("#figures", Static)
        if result is None:
            figures.update(f"generation {why}")
            return
        self.last = result
        if result.text and self.transcript and not self.transcript[-1][1].strip():
            self.transcript[-1] = ("model", result.text)
        per_stage = "  ".join(f"stage {s} {t * 1000:.1f} ms" for s, t in stages.items())
        figures.update(
            f"{result.new_tokens} tokens ({result.finish}) · first after "
            f"{result.ttft_s * 1000:.0f} ms · {result.tokens_per_s:.1f} tokens/s · "
            f"{result.decode_bytes_per_token_per_hop:.0f} B per token per hop"
            + (f"\nper token: {per_stage}" if per_stage else ""))
        self._draw()

    def _draw(self) -> None:
        box = self.query_one("#transcript", Static)
        if not self.transcript:
            why = self._ready()
            box.update(why or "Deployed: type a prompt below and press enter (each reply "
                       "sees the conversation so far; ctrl+n starts a new one).")
            return
        lines = []
        for who, text in self.transcript:
            style = "bold cyan" if who == "you" else "bold green"
            lines.append(f"[{style}]{who}:[/] {_escape(text)}")
        box.update("\n\n".join(lines) + (" ▌" if self.generating else ""))
        self.query_one("#conversation", VerticalScroll).scroll_end(animate=False)


def conversation(transcript: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The turns so far as chat messages, for the model's template: a reply stopped early
    counts as far as it went, and one that gave nothing is left out."""
    return [{"role": "user" if who == "you" else "assistant", "content": text}
            for who, text in transcript if text.strip()]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
