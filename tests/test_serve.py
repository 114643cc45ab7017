"""`periphery serve` as a user runs it: a real server process over 2 local node processes of
SmolLM2, reached with the official `openai` client and with raw HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from periphery_core.generate.engine import TextCodec
from tests.conftest import MODELS, require_shared
from tests.test_cli import ROOT, assert_bad_input, cli
from tests.test_generate import SMOLLM, _genai_greedy
from tests.waiting import wait_for

KEY = "test-key-0123456789"
PROMPT = "What is the capital of France?"


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int, log: list[str]) -> None:
        self.proc, self.port, self.log = proc, port, log  # log: its stderr lines so far
        self.base = f"http://127.0.0.1:{port}/v1"

    def request(self, method: str, path: str, body: bytes | None = None,
                key: str | None = KEY, conn: http.client.HTTPConnection | None = None
                ) -> tuple[int, bytes]:
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        c.request(method, path, body=body, headers=headers)
        response = c.getresponse()
        data = response.read()
        if conn is None:
            c.close()
        return response.status, data

    def metrics(self) -> str:
        status, data = self.request("GET", "/metrics")
        assert status == 200
        return data.decode()


@contextlib.contextmanager
def _serving(model: Path, *args: str) -> Iterator[Server]:
    """`periphery serve MODEL --local --port 0 ARGS` as a process, until the block ends."""
    require_shared()
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "periphery_core.cli.main", "serve", str(model), "--local",
         "--port", "0", *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        deadline = time.time() + 180
        assert proc.stderr is not None
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"periphery serve exited {proc.returncode}: {seen}")
            seen += line
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", seen)
            if found:
                break
        else:
            pytest.fail(f"periphery serve did not start: {seen}")
        # keep reading its stderr, so that it never blocks on a full pipe (and tests read it)
        log = seen.splitlines()
        threading.Thread(target=lambda: log.extend(line.rstrip("\n") for line in proc.stderr),
                         daemon=True).start()
        yield Server(proc, int(found.group(1)), log)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: it stops by itself, exit 0
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    assert code == 0, f"periphery serve did not stop on Ctrl-C (exit {code})"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with _serving(SMOLLM, "--shards", "2", "--api-key", KEY, "--max-concurrent", "8") as s:
        yield s


def _client(server: Server, key: str = KEY):  # type: ignore[no-untyped-def]
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base, api_key=key, max_retries=0, timeout=120)


def _expected(n: int, prompt: str = PROMPT) -> str:
    spec_codec = TextCodec(SMOLLM)
    ids = spec_codec.encode(spec_codec.prompt(prompt))
    (tokens,) = _genai_greedy(SMOLLM, [ids], n, (2,))
    return spec_codec.decode(tokens)


def test_the_openai_client_streams_the_greedy_reply(server: Server) -> None:
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct-int4"]
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct-int4", messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16, temperature=0, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    expected = _expected(16)
    assert "".join(pieces) == expected and "Paris" in expected
    assert len(pieces) > 3 and finish == "length"
    whole = client.chat.completions.create(
        model="x", messages=[{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": PROMPT}], max_tokens=8)
    assert whole.choices[0].message.content and whole.usage is not None
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 10
    text = client.completions.create(model="x", prompt="The sky is", max_tokens=6)
    assert text.choices[0].text and text.usage is not None
    assert text.usage.completion_tokens == 6


def test_a_server_that_loses_a_node_says_so_and_answers_the_same(tmp_path: Path) -> None:
    """`periphery serve` over two local nodes; one node SIGKILLed: the server logs the
    recovery in one line each (a server's operator reads its log, not a summary at the end)
    and the next request gets the undisturbed greedy reply; the node, the server's own, is
    started again at its address and the server spreads back over it, still answering the
    same."""
    psutil = pytest.importorskip("psutil")
    with _serving(SMOLLM, "--shards", "2", "--api-key", KEY) as server:
        nodes = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                 if "periphery_core.cli.node" in " ".join(p.cmdline())]
        (victim,) = [p for p in nodes if "local1" in p.cmdline()]
        victim.kill()
        wait_for(lambda: any(line.startswith("recovered:") for line in server.log), 60,
                 "the server to log its recovery")
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": PROMPT}],
                           "max_tokens": 8, "temperature": 0}).encode()
        status, data = server.request("POST", "/v1/chat/completions", body)
        assert status == 200, data
        assert json.loads(data)["choices"][0]["message"]["content"] == _expected(8)
        told = [line for line in server.log if line.startswith(("recovering:", "recovered:"))]
        assert len(told) == 2 and "lost local1" in told[0], told
        assert [line for line in server.log if re.match(
            r"node local1 exited \(signal 9\); started again at 127\.0\.0\.1:\d+", line)]
        if "(local0)" in told[1]:  # (else it restarted before its loss was noticed: 2 nodes)
            wait_for(lambda: [ln for ln in server.log if ln.startswith("spread back:")], 60,
                     "the server to spread back over the node started again")
            back = next(line for line in server.log if line.startswith("spread back:"))
            assert "local1 joined; serving again on 2 nodes" in back, back
        status, data = server.request("POST", "/v1/chat/completions", body)
        assert status == 200, data
        assert json.loads(data)["choices"][0]["message"]["content"] == _expected(8)
    print(f"\nperiphery serve: {told[1]}")


def test_eight_clients_stream_at_once_and_a_ninth_is_told_busy(server: Server) -> None:
    openai = pytest.importorskip("openai")
    client = _client(server)
    started = threading.Barrier(9, timeout=120)
    done: list[object] = [None] * 8

    def one(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                max_tokens=40, stream=True)
            text, first = "", True
            for chunk in stream:
                if first:
                    first = False
                    started.wait()
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            done[i] = text
        except Exception as exc:  # asserted below
            done[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()  # all 8 hold a slot now
    with pytest.raises(openai.RateLimitError, match="busy"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4)
    for t in threads:
        t.join(timeout=180)
    assert all(isinstance(d, str) and d for d in done), done
    figures = server.metrics()
    assert re.search(r'periphery_sequences_total\{outcome="rejected"\} [1-9]', figures)
    per_step = re.search(r"^periphery_sequences_per_step (\S+)$", figures, re.MULTILINE)
    assert per_step and float(per_step[1]) > 1.0


def test_a_client_gone_mid_stream_leaves_no_cache_on_any_node(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 400, "stream": True}).encode()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {KEY}",
                          "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    got = b""
    while got.count(b"data:") < 6:
        got += response.read1(4096)
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    held: list[int] = []

    def freed() -> bool:
        figures = server.metrics()
        held[:] = [int(float(v)) for v in
                   re.findall(r"periphery_kv_cache_bytes\{[^}]*\} (\S+)", figures)]
        cancelled = re.search(r'periphery_sequences_total\{outcome="cancelled"\} (\S+)',
                              figures)
        return bool(len(held) == 2 and not any(held) and cancelled
                    and float(cancelled[1]) >= 1
                    and "periphery_sequences_in_flight 0.0" in figures)

    wait_for(freed, 30, lambda: f"the nodes to free the stream's caches: still {held}",
             poll=0.5)


def test_keys_and_bad_bodies_get_4xx_and_the_server_keeps_serving(server: Server) -> None:
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    assert server.request("POST", "/v1/chat/completions", chat, key=None)[0] == 401
    status, data = server.request("POST", "/v1/chat/completions", chat, key="wrong-key-xyz")
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/v1/models", key=None)[0] == 401
    bad: list[tuple[str, bytes]] = [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[]"),
        ("/v1/chat/completions", b"{}"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard",
                                                            "content": "x"}]}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]})
         .encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "temperature": -1}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "n": 3}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 10**9}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "stop": ["a"] * 40}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 9000}).encode()),
        ("/v1/chat/completions", b'{"messages": "' + b"x" * (2 << 20) + b'"}'),
        ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode()),
        ("/v1/completions", json.dumps({"prompt": None}).encode()),
        ("/v1/completions", b"\xff\xfe\x00garbage"),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    statuses: dict[int, int] = {}
    for i in range(1000):
        path, body = bad[i % len(bad)]
        try:
            status, data = server.request("POST", path, body, conn=conn)
        except (http.client.HTTPException, OSError):  # the server closed after a 413
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            status, data = server.request("POST", path, body, conn=conn)
        assert 400 <= status < 500, (path, body[:80], status, data[:200])
        assert json.loads(data)["error"]["message"], data
        statuses[status] = statuses.get(status, 0) + 1
    conn.close()
    assert set(statuses) == {400, 413}
    # a message as a bare text: the line shows what a message looks like
    status, data = server.request("POST", "/v1/chat/completions",
                                  json.dumps({"messages": ["hi"]}).encode())
    assert status == 400 and json.loads(data)["error"]["message"] == \
        'messages.0: should be an object like {"role": "user", "content": "..."}', data
    status, data = server.request("POST", "/v1/chat/completions", chat)
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"]
    assert json.loads(server.request("GET", "/health")[1])["status"] == "ok"


def test_serve_refuses_what_it_cannot_do_in_one_line() -> None:
    require_shared()
    assert_bad_input(cli("serve", SMOLLM, "--local", "--host", "0.0.0.0"),
                     r"--host 0\.0\.0\.0 .*--api-key")
    assert_bad_input(cli("serve", SMOLLM, "--local", "--api-key", "short"),
                     r"at least 8 characters")



def test_other_models_take_named_tensors_at_v1_infer() -> None:
    """A model that is not a language model: POST /v1/infer over 2 node processes, in JSON and
    in msgpack, gives what ONNX Runtime gives on the whole model; wrong inputs are one 400
    line each, and the chat routes are not there."""
    import onnxruntime as ort

    model = MODELS / "mnist-8.onnx"
    image = np.random.default_rng(3).random((1, 1, 28, 28), dtype=np.float32)
    (expected,) = ort.InferenceSession(str(model)).run(None, {"Input3": image})
    with _serving(model, "--shards", "2") as srv:
        body = {"inputs": {"Input3": {"dtype": "float32", "shape": [1, 1, 28, 28],
                                      "data": image.tolist()}}}
        status, data = srv.request("POST", "/v1/infer", json.dumps(body).encode(), key=None)
        assert status == 200, data
        (out,) = json.loads(data)["outputs"].values()
        assert out["shape"] == [1, 10] and out["dtype"] == "float32"
        np.testing.assert_allclose(np.asarray(out["data"], np.float32), expected, atol=1e-4)
        packed = msgpack.packb({"inputs": {"Input3": {
            "dtype": "float32", "shape": [1, 1, 28, 28], "data": image.tobytes()}}})
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/infer", body=packed,
                     headers={"Content-Type": "application/msgpack"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.getheader("content-type") == "application/msgpack"
        (got,) = msgpack.unpackb(reply.read())["outputs"].values()
        conn.close()
        got_array = np.frombuffer(got["data"], np.float32).reshape(got["shape"])
        np.testing.assert_allclose(got_array, expected, atol=1e-4)
        wrong = [
            ({"inputs": {"image": body["inputs"]["Input3"]}}, "missing Input3; unknown image"),
            ({"inputs": {"Input3": {**body["inputs"]["Input3"], "dtype": "float64"}}},
             "is float32, not float64"),
            ({"inputs": {"Input3": {**body["inputs"]["Input3"], "shape": [1, 28, 28]}}},
             "has shape"),
            ({"inputs": {"Input3": {**body["inputs"]["Input3"], "dtype": "object"}}},
             "is not one of"),
            ({"inputs": {"Input3": {**body["inputs"]["Input3"], "data": [1, 2]}}},
             "2 values for shape"),
            # a bare list where a tensor goes: what a tensor looks like, not pydantic's class
            ({"inputs": {"Input3": [0.5, 1.0]}}, 'inputs.Input3: should be an object like '
             '{"dtype": "float32", "shape": [1, 3], "data": [0.5, 1.0, 2.0]}'),
            ([body], 'body: should be an object like {"inputs": {NAME: '),
        ]
        for request, message in wrong:
            status, data = srv.request("POST", "/v1/infer", json.dumps(request).encode(),
                                       key=None)
            assert status == 400 and message in json.loads(data)["error"]["message"], data
        status, data = srv.request("POST", "/v1/chat/completions", b"{}", key=None)
        assert status == 404 and "/v1/infer" in json.loads(data)["error"]["message"]


def test_the_endpoint_socket_turns_nagle_off() -> None:
    """The listening socket says it is TCP and has TCP_NODELAY, which the sockets it accepts
    inherit (asyncio turns Nagle off only on sockets that say IPPROTO_TCP). Without it, every
    request after the first on a kept-alive connection, as the openai client keeps them, waited
    for the client's delayed ACK: 42-46 ms instead of 0.3-1.8 (`benchmarks/serve.py`)."""
    import socket

    from periphery_core.serve.endpoint import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_serve_runs_the_replicas_a_plan_asks_for(tmp_path: Path) -> None:
    """`plan --nodes 2` on mnist-8 picks two replicas of the whole model; `serve --plan --local`
    starts both and answers through them."""
    require_shared()
    model = MODELS / "mnist-8.onnx"
    plan = tmp_path / "plan.json"
    made = cli("plan", model, "--nodes", "2", "-o", plan)
    assert made.returncode == 0 and "2 replicas x 1 stage" in made.stdout, made.stderr
    body = json.dumps({"inputs": {"Input3": {"dtype": "float32", "shape": [1, 1, 28, 28],
                                             "data": [0.25] * 784}}}).encode()
    with _serving(model, "--plan", str(plan)) as srv:
        for _ in range(4):
            status, data = srv.request("POST", "/v1/infer", body, key=None)
            assert status == 200, data


def test_serve_runs_a_language_model_as_replicas_and_stops_on_ctrl_c() -> None:
    """`periphery serve --replicas 2`: two local nodes, a replica each; greedy chat replies are
    onnxruntime-genai's tokens whichever replica takes them, and Ctrl-C stops it (exit 0,
    checked by `_serving`)."""
    codec = TextCodec(SMOLLM)
    prompts = [PROMPT, "Why is the sky blue?"]
    ids = [codec.encode(codec.prompt(p)) for p in prompts]
    expected = [codec.decode(t) for t in _genai_greedy(SMOLLM, ids, 10, ())]
    with _serving(SMOLLM, "--replicas", "2", "--insecure") as srv:
        for prompt, text in zip(prompts, expected, strict=True):
            body = {"model": "m", "max_tokens": 10,
                    "messages": [{"role": "user", "content": prompt}]}
            status, data = srv.request("POST", "/v1/chat/completions",
                                       json.dumps(body).encode(), key=None)
            assert status == 200, data
            assert json.loads(data)["choices"][0]["message"]["content"] == text
        metrics = srv.metrics()
        # each sequence ran on one replica, in turn: both served
        for replica in (0, 1):
            assert f'periphery_stage_compute_seconds{{replica="{replica}",stage="0"}}' in metrics
