"""Text generation across stages that keep their own KV caches.

The references are onnxruntime-genai in one process (a dev dependency) and a greedy loop over
the whole model in one process (`whole_model_step`), which agree on SmolLM2. Split runs go
through real node processes (LocalCluster) and the CLI as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.discovery import NodeAddress
from periphery_core.errors import ClusterBusy, PeripheryError
from periphery_core.generate.decoder import DecoderSpec, recognize
from periphery_core.generate.engine import (
    Generation,
    Sampling,
    TextCodec,
    generate,
    pipeline_step,
    whole_model_step,
)
from periphery_core.generate.stateful import StatefulStage, make_stateful, stage_state
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.model.loading import LoadedModel
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.chain import StageRunner
from tests.conftest import MODELS, require_shared
from tests.test_cli import ok
from tests.waiting import wait_for

SMOLLM = MODELS / "smollm2-135m-instruct-int4"
GPT2 = MODELS / "tiny-random-gpt2-past.onnx"
PROMPTS = [
    "What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
    "How many legs does a spider have?", "Say hello in Spanish.", "What is 12 times 12?",
    "Give me a word that rhymes with cat.", "Why is the sky blue?",
    "List two planets.", "What do bees make?",
]


@contextlib.contextmanager
def _deployed(loaded, spec, k: int, recover: bool = False):
    """K local node processes with the decoder deployed as stateful stages."""
    with LocalCluster(k) as cluster, Master(keys=cluster.master_keys) as master:
        handles = [master.connect(a) for a in cluster.addresses]
        pipeline = Pipeline(master, loaded, analyze(loaded), k=k, exact=False, decoder=spec,
                            recover=recover)
        try:
            pipeline.deploy([h.node_id for h in handles])
            yield cluster, master, pipeline
        finally:
            pipeline.close()


def _decoder(path: Path) -> tuple[LoadedModel, DecoderSpec]:
    """A decoder from ../shared (SMOLLM, GPT2) and its layout."""
    require_shared()
    loaded = load_model(path)
    spec = recognize(loaded)
    assert spec is not None
    return loaded, spec


def at_once(step, spec, prompts: list[list[int]], n: int) -> list[Generation | Exception]:
    """Every prompt generated greedily at once, a thread each, through `step`; each one's
    Generation, or what it raised."""
    got: list[Generation | Exception] = [RuntimeError("did not end")] * len(prompts)

    def run(i: int) -> None:
        try:
            got[i] = generate(step, spec, prompts[i], Sampling(max_new_tokens=n),
                              release=step.release)
        except Exception as exc:  # the caller asserts
            got[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got


def _greedy(step, spec, ids: list[int], n: int) -> list[int]:
    return generate(step, spec, ids, Sampling(max_new_tokens=n)).ids


_GENAI: dict[tuple, list[int]] = {}  # (folder, prompt, n) -> tokens: one reference run each


def _genai_greedy(folder: Path, prompts: list[list[int]], n: int,
                  eos: tuple[int, ...]) -> list[list[int]]:
    """onnxruntime-genai's greedy tokens in one process (its end token left out, as ours);
    each prompt's run once per test session."""
    og = pytest.importorskip("onnxruntime_genai")
    todo = [ids for ids in prompts if (str(folder), tuple(ids), n) not in _GENAI]
    if todo:
        for ids, tokens in zip(todo, _genai_run(og, folder, todo, n, eos), strict=True):
            _GENAI[(str(folder), tuple(ids), n)] = tokens
    return [list(_GENAI[(str(folder), tuple(ids), n)]) for ids in prompts]


def _genai_run(og: Any, folder: Path, prompts: list[list[int]], n: int,
               eos: tuple[int, ...]) -> list[list[int]]:
    model = og.Model(str(folder))
    out = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        tokens: list[int] = []
        while not gen.is_done() and len(tokens) < n:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        out.append(tokens[:-1] if tokens and tokens[-1] in eos else tokens)
    return out


def test_decoders_are_recognised() -> None:
    require_shared()
    genai = recognize(load_model(SMOLLM))
    assert genai is not None and genai.format == "onnxruntime-genai"
    assert genai.layers == 30 and len(genai.slots) == 60 and genai.eos_ids == (2,)
    assert genai.slots[0].empty_shape == (1, 3, 0, 64) and genai.mask == "attention_mask"
    gpt2 = recognize(load_model(GPT2))
    assert gpt2 is not None and gpt2.format == "gpt-2 stacked cache"
    assert gpt2.slots[0].axis == 3 and gpt2.positions == "position_ids"
    assert recognize(load_model(MODELS / "mnist-8.onnx")) is None


@pytest.mark.parametrize(("path", "k"), [(SMOLLM, 3), (GPT2, 2)], ids=["smollm2", "gpt2"])
def test_stateful_shards_keep_caches_and_match_the_whole_model(path: Path, k: int) -> None:
    loaded, spec = _decoder(path)
    analysis = analyze(loaded)
    shards = make_stateful(extract_shards(loaded, analysis, make_plan(analysis, k)), spec)
    pasts = {s.past for s in spec.slots} | {s.present for s in spec.slots}
    stages = []
    for shard in shards:
        state = stage_state(shard)
        assert state is not None
        stage = StatefulStage(StageRunner(shard), state, 1 << 30)
        # No cache and no mask crosses a boundary: only what the stage cannot make itself.
        assert not (set(stage.input_names) | set(stage.output_names)) & pasts
        assert spec.mask not in stage.input_names
        stages.append(stage)
    assert sum(len(s.state.slots) for s in stages) == len(spec.slots)

    def chain_step(ids: np.ndarray, seq: int, pos: int):
        values = {spec.input_ids: ids}
        for stage in stages:
            values = stage.run(values, seq, pos, int(ids.shape[1]))
        return values[spec.logits], ()

    prompt = [1, 504, 3365, 314, 260, 3575, 282] if path == SMOLLM else [5, 17, 300, 42]
    reference = _greedy(whole_model_step(loaded, spec, exact=True), spec, prompt, 24)
    assert _greedy(chain_step, spec, prompt, 24) == reference
    assert all(s.sequences == 1 for s in stages)
    for s in stages:
        s.release([1, 2, 3, *range(1, 1000)])
    assert all(s.sequences == 0 and s.cache_bytes == 0 for s in stages)


def test_a_full_cache_budget_is_a_busy_error_not_a_crash() -> None:
    loaded, spec = _decoder(GPT2)
    (shard,) = make_stateful(extract_shards(loaded, analyze(loaded),
                                            make_plan(analyze(loaded), 1)), spec)
    state = stage_state(shard)
    assert state is not None
    per_token = spec.cache_bytes_per_token()
    stage = StatefulStage(StageRunner(shard), state, budget_bytes=per_token * 6)
    ids = np.array([[1, 2, 3, 4]], dtype=spec.ids_dtype)
    stage.run({spec.input_ids: ids}, seq=1, pos=0, new=4)
    with pytest.raises(ClusterBusy, match="busy: the KV cache budget"):
        stage.run({spec.input_ids: ids}, seq=2, pos=0, new=4)
    assert stage.sequences == 1  # the refused sequence left nothing behind
    stage.release([1])
    stage.run({spec.input_ids: ids}, seq=2, pos=0, new=4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_generation_over_node_processes_is_token_identical(k: int) -> None:
    loaded, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    prompts = [codec.encode(codec.prompt(p)) for p in PROMPTS]
    expected = _genai_greedy(SMOLLM, prompts, 32, spec.eos_ids)
    if k == 1:  # the in-process baseline agrees with onnxruntime-genai too
        reference = whole_model_step(loaded, spec, exact=False)
        assert [_greedy(reference, spec, ids, 32) for ids in prompts] == expected
    with _deployed(loaded, spec, k) as (_, _, pipeline):
        step = pipeline_step(pipeline, spec)
        got = [generate(step, spec, ids, Sampling(max_new_tokens=32), release=step.release).ids
               for ids in prompts]
    assert got == expected


def test_bytes_per_hop_do_not_grow_with_the_context() -> None:
    loaded, spec = _decoder(SMOLLM)
    short = list(range(100, 116))
    long = list(range(100, 612))
    with _deployed(loaded, spec, 3) as (_, _, pipeline):
        step = pipeline_step(pipeline, spec)
        at16 = generate(step, spec, short, Sampling(max_new_tokens=6))
        at512 = generate(step, spec, long, Sampling(max_new_tokens=6))
    assert at16.decode_bytes_per_token_per_hop > 0
    ratio = at512.decode_bytes_per_token_per_hop / at16.decode_bytes_per_token_per_hop
    assert ratio <= 1.1, (at16.decode_bytes_per_token_per_hop,
                          at512.decode_bytes_per_token_per_hop)
    # What crosses a boundary is the hidden state (and a residual, or an MLP's projections
    # where the measured plan cuts inside one), not 30 layers of cache.
    assert at512.decode_bytes_per_token_per_hop < spec.cache_bytes_per_token() / 2


def test_generate_cli_streams_and_reports(tmp_path: Path) -> None:
    loaded, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    prompt = "What is the capital of France?"
    expected = _greedy(whole_model_step(loaded, spec), spec,
                       codec.encode(codec.prompt(prompt)), 12)
    out = json.loads(ok("generate", SMOLLM, "--local", "--shards", "2", "--prompt", prompt,
                        "--max-new-tokens", "12", "--json").stdout)
    assert out["ids"] == expected and "Paris" in out["text"]
    assert out["new_tokens"] == 12 and out["prompt_tokens"] > 10
    assert out["tokens_per_s"] > 0 and out["ttft_s"] > 0
    # a hidden state and a residual (or, cut inside an MLP, its two projections): never the
    # 45 KiB of cache per token
    assert 0 < out["decode_bytes_per_token_per_hop"] < spec.cache_bytes_per_token() / 2
    ok("plan", SMOLLM, "--shards", "3", "-o", tmp_path / "plan.json")
    streamed = ok("generate", SMOLLM, "--local", "--plan", tmp_path / "plan.json", "--prompt",
                  prompt, "--max-new-tokens", "12")
    assert streamed.stdout.strip() == out["text"].strip()
    assert "tokens/s" in streamed.stderr


def test_a_node_lost_mid_generation_costs_no_sequence() -> None:
    """8 sequences at once over 3 node processes; one node SIGKILLed mid-generation. The
    pipeline re-plans onto the 2 survivors, each sequence's caches are rebuilt, and every
    sequence ends exactly as an undisturbed run does. The node, started again at its address,
    gets a stage back once no sequence holds caches on the pipeline (a deploy drops them), and
    the next sequence over three nodes is the undisturbed one too."""
    import threading

    from periphery_core.cluster import events as ev

    loaded, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    prompts = [codec.encode(codec.prompt(p)) for p in PROMPTS[:8]]
    n = 48
    expected = _genai_greedy(SMOLLM, prompts, n, spec.eos_ids)
    results: list[object] = [None] * len(prompts)
    with _deployed(loaded, spec, 3, recover=True) as (cluster, master, pipeline):
        lost: list[ev.NodeLost] = []
        master.bus.subscribe(lambda e: lost.append(e) if isinstance(e, ev.NodeLost) else None)
        step = pipeline_step(pipeline, spec)

        def run(i: int) -> None:
            try:
                results[i] = generate(step, spec, prompts[i], Sampling(max_new_tokens=n),
                                      release=step.release)
            except Exception as exc:  # recorded, asserted below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        # mid-generation: the prompts are in and batched decode steps are running (each
        # sequence has 48 tokens to go, so most are still far from done)
        wait_for(lambda: step.batches >= 2, 120, "batched decode steps to start")
        cluster.kill(1)
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads)
        assert pipeline.failed is None and len(pipeline.recoveries) == 1
        assert pipeline.recoveries[0].stages == 2 and lost
        assert step.mean_batch > 1.2  # the sequences' decode steps shared runs
        assert master.sequences() == 0  # every sequence released its caches
        held: list[int] = []  # a sequence whose caches stay on the stages (not released)
        generate(step, spec, prompts[1], Sampling(max_new_tokens=2), release=held.append)
        assert master.sequences() == 1
        cluster.restart(1)
        wait_for(lambda: cluster.addresses[1].node_id in
                 {h.node_id for h in master.alive_nodes()}, 60, "the new process to join")
        time.sleep(1.5)  # a few turns of the pipeline's loop: it waits for that sequence
        assert len(pipeline.assignment) == 2
        step.release(held[0])
        wait_for(lambda: len(pipeline.assignment) == 3, 30,
                 "the pipeline to spread back once no sequence holds caches")
        assert cluster.addresses[1].node_id in pipeline.assignment
        again = generate(step, spec, prompts[0], Sampling(max_new_tokens=n),
                         release=step.release)
        assert again.ids == expected[0]
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed
    got = [r.ids for r in results]  # type: ignore[attr-defined]
    assert got == expected
    assert sum(r.rebuilt for r in results) >= 1  # type: ignore[attr-defined]


def test_nodes_report_the_caches_they_hold_and_free_them_on_release() -> None:
    from periphery_core.cluster import events as ev

    loaded, spec = _decoder(GPT2)
    held: dict[str, tuple[int | None, int | None]] = {}
    with _deployed(loaded, spec, 2) as (_, master, pipeline):
        master.bus.subscribe(lambda e: held.__setitem__(e.node_id, (e.kv_bytes, e.sequences))
                             if isinstance(e, ev.NodeStats) else None)
        step = pipeline_step(pipeline, spec)
        prompt = [5, 17, 300, 42]
        ended: list[int] = []  # the sequence ends, but its caches are not released yet
        result = generate(step, spec, prompt, Sampling(max_new_tokens=6), release=ended.append)
        cached = (len(prompt) + result.new_tokens - 1) * spec.cache_bytes_per_token()

        def total() -> tuple[int, int]:
            return (sum(kv or 0 for kv, _ in held.values()),
                    max((n or 0 for _, n in held.values()), default=0))

        wait_for(lambda: total() == (cached, 1), 10,
                 lambda: f"the stats to show one sequence's {cached} cache bytes: {total()}")
        master.release_sequences(ended)
        wait_for(lambda: total() == (0, 0), 10,
                 lambda: f"the stats to show the caches freed: {total()}")


def test_the_planner_counts_each_stage_s_caches_and_sends_none() -> None:
    require_shared()
    from periphery_core.errors import PlanError
    from periphery_core.partition.plan import DeviceSpec

    loaded, spec = _decoder(SMOLLM)
    analysis = analyze(loaded)
    plain = make_plan(analysis, 2)
    state = spec.state_bytes(1024, 4)
    planned = make_plan(analysis, 2, state=state)
    total_cache = sum(size for _, size in state.values())
    assert sum(s.memory_bytes for s in planned.stages) >= \
        sum(s.memory_bytes for s in plain.stages) + total_cache * 0.99
    caches = {s.past for s in spec.slots} | {s.present for s in spec.slots}
    crossing = [b for s in planned.stages for b in (*s.inputs, *s.outputs) if b.name in caches]
    assert crossing and all(b.nbytes == 0 for b in crossing)  # listed, costing nothing
    tight = [DeviceSpec(name=n, memory_bytes=planned.stages[0].memory_bytes // 2)
             for n in ("a", "b")]
    with pytest.raises(PlanError, match="memory cap"):
        make_plan(analysis, 2, state=state, devices=tight)


def test_sampling_is_seeded_and_chunked_prefill_matches_one_step() -> None:
    require_shared()
    from periphery_core.generate.engine import pick

    loaded, spec = _decoder(GPT2)
    step = whole_model_step(loaded, spec, exact=True)
    prompt = [5, 17, 300, 42, 7, 99, 512, 3, 8, 64, 21]
    whole = generate(step, spec, prompt, Sampling(max_new_tokens=12)).ids
    chunked = generate(step, spec, prompt, Sampling(max_new_tokens=12, prefill_chunk=3)).ids
    assert chunked == whole
    warm = Sampling(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    first = generate(step, spec, prompt, warm).ids
    assert generate(step, spec, prompt, warm).ids == first  # a seed repeats a run
    assert first != whole  # and sampling is not greedy
    logits = np.array([0.0, 5.0, 4.9, -1.0])
    rng = np.random.default_rng(0)
    assert pick(logits, [], Sampling(), rng) == 1
    assert pick(logits, [1], Sampling(repetition_penalty=2.0), rng) == 2
    assert {pick(logits, [], Sampling(temperature=1.0, top_k=2), rng) for _ in range(50)} \
        == {1, 2}


def test_hugging_face_cache_names_are_recognised(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    def vi(name: str, dtype: int, dims: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, dims)

    cache = ["batch_size", 2, "past_sequence_length", 4]
    inputs = [vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              vi("attention_mask", TensorProto.INT64,
                 ["batch_size", "past_sequence_length + 1"]),
              vi("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              vi("past_key_values.0.key", TensorProto.FLOAT, cache),
              vi("past_key_values.0.value", TensorProto.FLOAT, cache)]
    outputs = [vi("logits", TensorProto.FLOAT, ["batch_size", "sequence_length"]),
               vi("present.0.key", TensorProto.FLOAT, cache),
               vi("present.0.value", TensorProto.FLOAT, cache)]
    nodes = [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    model = helper.make_model(helper.make_graph(nodes, "hf", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16,
         "eos_token_id": [0, 7], "max_position_embeddings": 256}))
    onnx.save(model, str(tmp_path / "model.onnx"))
    spec = recognize(load_model(tmp_path))
    assert spec is not None and spec.format == "hugging-face"
    assert spec.positions == "position_ids" and spec.mask == "attention_mask"
    assert [s.present for s in spec.slots] == ["present.0.key", "present.0.value"]
    assert spec.slots[0].empty_shape == (1, 2, 0, 4) and spec.slots[0].axis == 2
    assert spec.eos_ids == (0, 7) and spec.context == 256


def test_a_node_keeps_to_the_kv_budget_it_was_given(tmp_path: Path) -> None:
    """`periphery-node --kv-budget SIZE`, the option the busy error names: a node process
    given room for 6 tokens of GPT-2's caches serves a 4-token prompt, refuses to grow it past
    the budget with that one line, and a size that is not one is refused at start."""
    loaded, spec = _decoder(GPT2)
    bad = subprocess.run([sys.executable, "-m", "periphery_core.cli.node", "--insecure",
                          "--no-advertise", "--port", "0", "--kv-budget", "six tokens"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: --kv-budget: 'six tokens' is not a size: give a number of bytes with an "
        "optional unit, such as 512MiB or 2GB"]
    budget = spec.cache_bytes_per_token() * 6
    proc = subprocess.Popen(
        [sys.executable, "-m", "periphery_core.cli.node", "--insecure", "--no-advertise",
         "--port", "0", "--name", "small", "--parent-pid", str(os.getpid()),
         "--state-dir", str(tmp_path / "state"),  # killed below: nothing left in /tmp
         "--kv-budget", f"{budget}B"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        port = int(line.split("control=tcp://")[1].split()[0].rsplit(":", 1)[1])
        with Master() as master:
            handle = master.connect(NodeAddress("small", "small", "127.0.0.1", port, {},
                                                "static"))
            pipeline = Pipeline(master, loaded, analyze(loaded), k=1, exact=False,
                                decoder=spec, recover=False)
            try:
                pipeline.deploy([handle.node_id])
                step = pipeline_step(pipeline, spec)
                fits = generate(step, spec, [5, 6, 7, 8], Sampling(max_new_tokens=2),
                                release=step.release)
                assert len(fits.ids) == 2
                with pytest.raises(PeripheryError, match=r"KV cache budget \(0 MiB\) is full.*"
                                                         r"larger --kv-budget"):
                    generate(step, spec, [5, 6, 7, 8], Sampling(max_new_tokens=6),
                             release=step.release)
            finally:
                pipeline.close()
    finally:
        proc.kill()
        proc.wait()
