"""The Chat screen driven by Pilot against real node processes: a language model opened,
planned and deployed by `--demo`, a prompt typed, the reply streamed and its figures shown."""

from __future__ import annotations

import pytest
from textual.widgets import Input

from periphery_app.app import PeripheryApp
from periphery_app.sample import DEMO_MODEL, ask_chat, until
from periphery_app.screens.chat import ChatScreen
from periphery_app.screens.modals import ErrorModal
from periphery_core.generate.decoder import recognize
from periphery_core.generate.engine import Sampling, TextCodec, generate, whole_model_step
from periphery_core.model import load_model
from tests.conftest import MODELS, require_shared
from tests.test_app import SIZE, config_dir, text_of  # noqa: F401  (autouse fixture)

SMOLLM = MODELS / "smollm2-135m-instruct-int4"
pytestmark = pytest.mark.asyncio


def _expected(prompt: str | list[dict[str, str]], n: int) -> str:
    """The unsplit model's greedy reply to a prompt, or to a conversation's messages."""
    loaded = load_model(SMOLLM)
    spec = recognize(loaded)
    assert spec is not None
    codec = TextCodec(spec.folder)
    ids = codec.encode(codec.prompt(prompt) if isinstance(prompt, str) else codec.chat(prompt))
    return generate(whole_model_step(loaded, spec), spec, ids, Sampling(max_new_tokens=n),
                    codec).text


def _chat_shown(app: PeripheryApp) -> bool:
    """The Chat screen is current and composed (its widgets can be queried)."""
    return isinstance(app.screen, ChatScreen) and bool(app.screen.query("#transcript"))


def _offers_stop(app: PeripheryApp) -> bool:
    """Whether escape stops a reply now (the footer shows the keys that are active)."""
    return any(b.action == "stop" for _, b, enabled, _ in app.screen.active_bindings.values()
               if enabled)


async def test_chat_streams_a_reply_from_the_deployed_language_model() -> None:
    require_shared()
    prompt = "What is the capital of France?"
    expected = _expected(prompt, 16)
    app = PeripheryApp(SMOLLM, demo=True, demo_nodes=2, browse_dir=SMOLLM)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: _chat_shown(app), timeout=120)
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        assert "Recognised" not in text_of(app, "#transcript")
        await ask_chat(pilot, prompt, max_new_tokens=16, timeout=60)
        assert screen.last is not None and screen.last.text == expected
        assert "Paris" in text_of(app, "#transcript")
        figures = text_of(app, "#figures")
        assert "tokens/s" in figures and "stage 0" in figures and "stage 1" in figures
        # A long reply stopped with escape: the screen says so and takes the next prompt.
        screen.max_new_tokens = 400
        screen.query_one("#prompt", Input).value = "Tell me a long story."
        await pilot.press("enter")
        await until(pilot, lambda: screen.generating, timeout=10)
        assert _offers_stop(app)  # the footer offers it while a reply is generated ...
        await pilot.press("escape")
        await until(pilot, lambda: not screen.generating, timeout=30)
        assert "stopped" in text_of(app, "#figures")
        await until(pilot, lambda: not _offers_stop(app))  # ... and not once it has stopped
        assert not any(isinstance(s, ErrorModal) for s in app.screen_stack)
        await pilot.press("escape")  # nothing generating: back, out of the prompt box
        await until(pilot, lambda: not isinstance(app.screen, ChatScreen))
        await pilot.press("5")  # the dashboard counts tokens and shows the nodes' caches
        await until(pilot, lambda: "KV cache" in text_of(app, "#utilisation"), timeout=10)
        assert "tokens/s" in text_of(app, "#label-rps")
        # It names what it serves: the folder's name says which model.onnx this is.
        assert "smollm2-135m-instruct-int4/model.onnx" in text_of(app, "#load")
        await pilot.press("1")  # the Model screen says what it recognised
        await pilot.pause()
        summary = " ".join(text_of(app, "#summary").split())
        assert "Recognised onnxruntime-genai decoder, 30 layers, 3 KV heads of 64" in summary
        await pilot.press("q")
    assert app.control.local is None


async def test_chat_over_the_planner_s_replicas_of_the_language_model() -> None:
    """`p` on the Shards screen asks the planner for its shape: SmolLM2 fits a node, so two
    replicas of one stage; deployed, the Chat screen's replies come from them, the same text
    as the unsplit model's, and the dashboard shows both replicas. The second prompt goes with
    the first turn (the unsplit model's reply to the whole conversation, not to the prompt
    alone), and ctrl+n starts a conversation afresh."""
    require_shared()
    prompts = ("What is the capital of France?", "And of Germany?")
    first = _expected(prompts[0], 12)
    expected = [first, _expected([{"role": "user", "content": prompts[0]},
                                  {"role": "assistant", "content": first},
                                  {"role": "user", "content": prompts[1]}], 12)]
    assert expected[1] != _expected(prompts[1], 12)  # the context changes the reply
    app = PeripheryApp(SMOLLM, demo=True, demo_nodes=2, browse_dir=SMOLLM)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: _chat_shown(app), timeout=120)
        await pilot.press("escape")  # out of the prompt box
        await until(pilot, lambda: not isinstance(app.screen, ChatScreen))
        await pilot.press("3", "p")
        await until(pilot, lambda: app.plan is not None and app.plan.replicas == 2, timeout=60)
        assert app.plan is not None and app.plan.k == 1
        assert "shape 2 replicas x 1 stage" in text_of(app, "#controls")
        await pilot.press("d")
        await until(pilot, lambda: app.cluster_state.deploy_status == "deployed"
                    and app.cluster_state.replicas == 2, timeout=90)
        await pilot.press("7")
        await until(pilot, lambda: _chat_shown(app), timeout=10)
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        for prompt, text in zip(prompts, expected, strict=True):
            await ask_chat(pilot, prompt, max_new_tokens=12, timeout=60)
            assert screen.last is not None and screen.last.text == text
        await pilot.press("ctrl+n")  # a new conversation: the prompt alone again
        await until(pilot, lambda: not screen.transcript)
        await ask_chat(pilot, prompts[0], max_new_tokens=12, timeout=60)
        assert screen.last is not None and screen.last.text == first
        assert not any(isinstance(s, ErrorModal) for s in app.screen_stack)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ChatScreen))
        await pilot.press("5")
        await until(pilot, lambda: "R1·S0" in text_of(app, "#stages"), timeout=10)
        await pilot.press("q")
    assert app.control.local is None


async def test_chat_says_what_to_do_for_a_model_that_is_not_a_language_model() -> None:
    app = PeripheryApp(DEMO_MODEL, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.opened is not None)
        await pilot.press("7")
        await until(pilot, lambda: _chat_shown(app))
        assert "not a language model" in text_of(app, "#transcript")
        box = app.screen.query_one("#prompt", Input)
        assert not box.has_focus  # nothing to chat with: the screen keys go to the screen
        box.focus()
        box.value = "hi"
        await pilot.press("enter")
        await pilot.pause()
        assert "Cannot chat" in text_of(app, "#figures")
        box.blur()
        await pilot.press("3")
        await until(pilot, lambda: app.current_mode == "shards")
