"""The app serves its deployed model over HTTP: Pilot drives `--demo` (SmolLM2 on two real
node processes), `s` on the Cluster screen starts the endpoint, the official openai client
talks to it, the screen shows the endpoint and its requests, and `s` stops it."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request

import pytest

from periphery_app.app import PeripheryApp
from periphery_app.sample import until
from periphery_app.screens.cluster import ClusterScreen
from tests.conftest import require_shared
from tests.test_app import SIZE, config_dir, text_of  # noqa: F401  (autouse fixture)
from tests.test_app_chat import SMOLLM, _chat_shown, _expected

pytestmark = pytest.mark.asyncio


def _ask(url: str, prompt: str, n: int) -> str:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    text = ""
    for chunk in client.chat.completions.create(
            model="smollm2-135m-instruct-int4", messages=[{"role": "user", "content": prompt}],
            max_tokens=n, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


async def test_s_serves_the_deployed_model_and_the_cluster_screen_shows_it() -> None:
    require_shared()
    prompt = "What is the capital of France?"
    expected = _expected(prompt, 12)
    app = PeripheryApp(SMOLLM, demo=True, demo_nodes=2, browse_dir=SMOLLM)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: _chat_shown(app), timeout=120)
        await pilot.press("escape")  # out of the Chat screen's prompt box
        await until(pilot, lambda: not _chat_shown(app))
        await pilot.press("4")
        await until(pilot, lambda: isinstance(app.screen, ClusterScreen))
        assert "endpoint" not in text_of(app, "#summary")
        await pilot.press("s")
        await until(pilot, lambda: re.search(r"endpoint \S*http://127\.0\.0\.1:\d+/v1",
                                             text_of(app, "#summary")) is not None,
                    timeout=30)
        endpoint = app.control.endpoint
        assert endpoint is not None
        assert "OpenAI API" in text_of(app, "#summary")
        reply = await asyncio.to_thread(_ask, endpoint.url, prompt, 12)
        assert reply == expected
        await until(pilot, lambda: re.search(r"[1-9]\d* answered",
                                             text_of(app, "#summary")) is not None,
                    timeout=10)
        await pilot.press("s")
        await until(pilot, lambda: "endpoint" not in text_of(app, "#summary"), timeout=20)
        assert app.control.endpoint is None
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(endpoint.url + "/models", timeout=5)
        await pilot.press("q")
    assert app.control.local is None
