"""Decode steps of several sequences batched into one run of each stage.

The stages are real ONNX Runtime sessions of real decoders from ../shared: SmolLM2
(GroupQueryAttention, "packed" caches, where batching is bit-exact) and the GPT-2 stacked-cache
model (com.microsoft Attention, "appended" caches, position ids given). Batched runs are
compared with the same steps run one sequence at a time.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from periphery_core.errors import RuntimeFailure
from periphery_core.generate.decoder import recognize
from periphery_core.generate.engine import (
    Generation,
    Sampling,
    TextCodec,
    generate,
    pipeline_step,
)
from periphery_core.generate.planning import plan_model
from periphery_core.generate.stateful import (
    CACHE_LOST,
    StatefulStage,
    greedy_name,
    make_stateful,
    stage_state,
)
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.plan import DeviceSpec
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.session import SessionConfig
from tests.conftest import require_shared
from tests.test_cli import assert_bad_input, cli, ok
from tests.test_generate import (
    GPT2,
    PROMPTS,
    SMOLLM,
    _decoder,
    _deployed,
    _genai_greedy,
    at_once,
)


def _chain(path, k: int, on_device: bool = False):
    """The decoder at `path` split into `k` stateful stages, twice (two independent chains;
    the second keeps its caches as ONNX Runtime values when `on_device`)."""
    require_shared()
    loaded = load_model(path)
    spec = recognize(loaded)
    assert spec is not None and spec.batchable
    analysis = analyze(loaded)
    shards = make_stateful(extract_shards(loaded, analysis, make_plan(analysis, k)), spec)

    def stages(on_device: bool = False) -> list[StatefulStage]:
        out = []
        for shard in shards:
            state = stage_state(shard)
            assert state is not None
            out.append(StatefulStage(StageRunner(shard, SessionConfig(exact=False)), state,
                                     1 << 30, on_device=on_device))
        return out

    return spec, stages(), stages(on_device)


def _single(stages, spec, ids, seq, pos):
    values = {spec.input_ids: np.asarray(ids, dtype=spec.ids_dtype)}
    for stage in stages:
        values = stage.run(values, seq, pos, len(ids[0]))
    return values[spec.logits]


def _batched(stages, spec, tokens, seqs, poss):
    values = {spec.input_ids: np.asarray([[t] for t in tokens], dtype=spec.ids_dtype)}
    for stage in stages:
        values = stage.run_batch(values, seqs, poss)
    return values[spec.logits]


@pytest.mark.parametrize(("path", "exact"), [(SMOLLM, True), (GPT2, False)],
                         ids=["smollm2-packed", "gpt2-appended"])
def test_batched_decode_steps_equal_steps_one_sequence_at_a_time(path, exact: bool) -> None:
    """Sequences of different lengths share each run of a 2-stage chain (what crosses the
    boundary is batched too); the batch changes as sequences join and its order changes.
    Every row's logits and every cache kept afterwards equal the one-at-a-time run's: bit for
    bit on SmolLM2, within float rounding on GPT-2's fp32 MatMuls."""
    spec, one, many = _chain(path, 2)
    rng = np.random.default_rng(7)
    lengths = {1: 5, 2: 11, 3: 3, 4: 8}
    last: dict[int, int] = {}
    for seq, n in lengths.items():
        ids = rng.integers(3, 900, (1, n)).tolist()
        a = _single(one, spec, ids, seq, 0)
        b = _single(many, spec, ids, seq, 0)
        assert np.array_equal(a, b)
        assert a.shape[1] == 1  # of a prompt's logits, only the last position comes back
        last[seq] = int(a[0, -1].argmax())
    pos = dict(lengths)
    # the same batch three times (its outputs are reused as the next pasts where "packed"),
    # then a reordered batch, then a sequence joins (both copy the pasts into a new batch)
    for seqs in ([1, 2, 3], [1, 2, 3], [1, 2, 3], [3, 1, 2], [3, 1, 2, 4], [2, 4]):
        single = [_single(one, spec, [[last[s]]], s, pos[s])[0, -1] for s in seqs]
        batched = _batched(many, spec, [last[s] for s in seqs], seqs, [pos[s] for s in seqs])
        assert batched.shape[0] == len(seqs)
        for row, s in enumerate(seqs):
            if exact:
                assert np.array_equal(batched[row, -1], single[row]), (seqs, s)
            else:
                np.testing.assert_allclose(batched[row, -1], single[row], atol=1e-5)
            last[s] = int(single[row].argmax())
            pos[s] += 1
    for a, b in zip(one, many, strict=True):
        assert a.sequences == b.sequences == 4 and a.cache_bytes == b.cache_bytes
        for seq in lengths:
            for name, value in a._seqs[seq].cache.items():
                kept = b._seqs[seq].cache[name]
                assert kept.shape == value.shape
                if exact:
                    assert np.array_equal(kept, value)
                else:
                    np.testing.assert_allclose(kept, value, atol=1e-5)


def test_batches_in_flight_in_turn_reuse_their_own_outputs() -> None:
    """Two batches in flight come back to a stage in turn ([1, 2], [3, 4], [1, 2], ...). Each
    batch's next step runs on the outputs of its own last run, not copied (a copy of every
    layer's cache cost 25% of a 2-row step), every row equals the one-at-a-time run, and the
    outputs are let go when their sequences end."""
    spec, one, many = _chain(SMOLLM, 2)
    rng = np.random.default_rng(3)
    pos, last = {}, {}
    for seq, n in {1: 6, 2: 9, 3: 4, 4: 7}.items():
        ids = rng.integers(3, 900, (1, n)).tolist()
        _single(one, spec, ids, seq, 0)
        last[seq] = int(_single(many, spec, ids, seq, 0)[0, -1].argmax())
        pos[seq] = n
    fed: list[dict[str, np.ndarray]] = []
    made: list[dict[str, np.ndarray]] = []
    stage = many[0]
    run = stage.runner.run

    def watched(feeds):
        fed.append(dict(feeds))
        out = run(feeds)
        made.append(out)
        return out

    stage.runner.run = watched
    turns = [[1, 2], [3, 4]] * 3
    for seqs in turns:
        single = [_single(one, spec, [[last[s]]], s, pos[s])[0, -1] for s in seqs]
        batched = _batched(many, spec, [last[s] for s in seqs], seqs, [pos[s] for s in seqs])
        for row, s in enumerate(seqs):
            assert np.array_equal(batched[row, -1], single[row]), (seqs, s)
            last[s] = int(single[row].argmax())
            pos[s] += 1
    slots = stage.state.slots
    for i in range(2, len(turns)):  # from its second run on, each batch reuses its own outputs
        assert all(fed[i][past] is made[i - 2][present] for past, present, *_ in slots), i
    assert len(stage._batches) == 2
    stage.release([1, 2])
    assert len(stage._batches) == 1
    stage.release([3, 4])
    assert stage._batches == {} and stage.cache_bytes == 0


def test_a_bad_batch_fails_alone_and_says_why() -> None:
    spec, stages, _ = _chain(GPT2, 1)
    (stage,) = stages
    ids = np.asarray([[5, 17, 300]], dtype=spec.ids_dtype)
    stage.run({spec.input_ids: ids}, seq=1, pos=0, new=3)
    stage.run({spec.input_ids: ids}, seq=2, pos=0, new=3)
    step = {spec.input_ids: np.asarray([[4], [4]], dtype=spec.ids_dtype)}
    with pytest.raises(RuntimeFailure, match=CACHE_LOST):  # sequence 2 holds 3, not 2
        stage.run_batch(step, [1, 2], [3, 2])
    with pytest.raises(RuntimeFailure, match="distinct sequences"):
        stage.run_batch(step, [1, 1], [3, 3])
    with pytest.raises(RuntimeFailure, match="one position each"):
        stage.run_batch(step, [1, 2], [3])
    out = stage.run_batch(step, [1, 2], [3, 3])  # nothing was spoiled by the refusals
    assert out[spec.logits].shape[0] == 2 and stage.sequences == 2


def test_concurrent_sequences_share_batched_steps_over_node_processes() -> None:
    """4 sequences at once over 2 node processes: their decode steps travel batched (more
    than one sequence per step on average) and every sequence's greedy tokens are exactly
    onnxruntime-genai's."""
    loaded, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    prompts = [codec.encode(codec.prompt(p)) for p in PROMPTS[:4]]
    expected = _genai_greedy(SMOLLM, prompts, 24, spec.eos_ids)
    with _deployed(loaded, spec, 2) as (_, _, pipeline):
        step = pipeline_step(pipeline, spec)
        got = [g.ids if isinstance(g, Generation) else g
               for g in at_once(step, spec, prompts, 24)]
        assert step.batches > 0 and step.mean_batch > 1.2, step.mean_batch
        step.close()
    assert got == expected


def test_a_decoder_is_planned_on_measured_decode_costs() -> None:
    """On nodes whose speed check says 20x (what local nodes here report), FLOP estimates
    made SmolLM2's compute look cheap next to the logits the last stage sends, and the plan
    left that stage no layer at all; planned on a measured decode step, K = 2 gives each stage
    a fair share of the 30 layers and says its costs are measured."""
    loaded, spec = _decoder(SMOLLM)
    nodes = [DeviceSpec(name=f"node{i}", speed=20.0, bandwidth=1.25e8) for i in range(2)]
    plan = plan_model(loaded, analyze(loaded), 2, devices=nodes, decoder=spec)
    assert plan.cost_basis == "profile"
    layers = [len({n.split("/")[2] for n in s.nodes if n.startswith("/model/layers.")})
              for s in plan.stages]
    assert min(layers) >= 10, layers
    fast, slow = sorted(s.compute_s for s in plan.stages)
    assert slow <= 1.5 * fast


def test_generate_cli_runs_several_prompts_at_once(tmp_path) -> None:
    """The user's path: `periphery generate` with several prompts over 2 local node processes
    gives each prompt the tokens it gets alone, with steps shared between them."""
    _, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    asked = PROMPTS[:3]
    expected = _genai_greedy(SMOLLM, [codec.encode(codec.prompt(p)) for p in asked], 12,
                             spec.eos_ids)
    listed = tmp_path / "prompts.txt"
    listed.write_text("\n".join(asked[1:]) + "\n\n", encoding="utf-8")
    out = json.loads(ok("generate", SMOLLM, "--local", "--shards", "2", "--prompt", asked[0],
                        "--prompts", listed, "--max-new-tokens", "12", "--json").stdout)
    assert [r["ids"] for r in out["results"]] == expected
    assert out["sequences"] == 3 and out["aggregate_tokens_per_s"] > 0
    assert out["sequences_per_step"] > 1.0
    text = ok("generate", SMOLLM, "--local", "--shards", "1", "--prompt", asked[0],
              "--prompt", asked[2], "--max-new-tokens", "6")
    assert sorted(re.findall(r"^\[(\d)\] ", text.stdout, re.MULTILINE)) == ["1", "2"]
    assert "2 sequences" in text.stderr and "tokens/s together" in text.stderr
    assert_bad_input(cli("generate", SMOLLM, "--local", "--max-new-tokens", "4"),
                     r"--prompt TEXT .*--prompts FILE")
    # the value that is wrong, and what to give
    assert_bad_input(cli("generate", SMOLLM, "--local", "--prompt", "x", "--top-p", "1.5"),
                     r"^error: sampling: top-p 1.5: give more than 0 and at most 1$")


def test_a_greedy_step_brings_home_the_token_not_the_logits() -> None:
    """With greedy picking, the last stage sends each row's best token instead of 192 KiB of
    logits; the tokens are the same, and sampling still gets the whole vocabulary."""
    spec, (stage,), _ = _chain(SMOLLM, 1)
    ids = np.asarray([[1, 504, 3365, 314]], dtype=spec.ids_dtype)
    full = stage.run({spec.input_ids: ids}, seq=1, pos=0, new=4)[spec.logits]
    best = stage.run({spec.input_ids: ids}, seq=2, pos=0, new=4, greedy=True)
    assert spec.logits not in best
    assert best[greedy_name(spec.logits)].tolist() == [int(full[0, -1].argmax())]
    loaded, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    prompt = codec.encode(codec.prompt(PROMPTS[0]))
    with _deployed(loaded, spec, 2) as (_, _, pipeline):
        step = pipeline_step(pipeline, spec)
        greedy = generate(step, spec, prompt, Sampling(max_new_tokens=6), release=step.release)
        sampled = generate(step, spec, prompt, Sampling(max_new_tokens=6, temperature=0.7,
                                                        seed=1), release=step.release)
        step.close()
    assert greedy.ids == _genai_greedy(SMOLLM, [prompt], 6, spec.eos_ids)[0]
    home = [b[-1] for b in greedy.hop_bytes]  # what the last stage sent the master per step
    assert home and max(home) < 1024, home
    assert min(b[-1] for b in sampled.hop_bytes) >= 4 * 49152  # the whole vocabulary, float32
