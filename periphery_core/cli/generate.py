"""`periphery generate`: text from a decoder LLM split over nodes that keep their KV caches."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from periphery_core.cli.cluster import keys_options
from periphery_core.cli.common import cli, handle_errors, json_option
from periphery_core.cli.deploy import deploy_options, deployed, where_to_run
from periphery_core.errors import PeripheryError


@cli.command()
@deploy_options
@click.option("--prompt", "prompts", multiple=True,
              help="What to ask (or the text to continue). Repeat it, or give --prompts, to "
                   "generate several at once: their decode steps share each stage's runs.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="A text file of prompts, one a line, generated at once.")
@click.option("--system", default=None, help="A system message for the chat template.")
@click.option("--no-chat", is_flag=True, help="Feed the prompt as it is, no chat template.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, help="0: off.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--stop", "stops", multiple=True, help="Stop at this text (repeatable).")
@click.option("--optimize/--exact", default=True, show_default=True,
              help="Graph optimizations on the nodes (fast), or off (bit-exact).")
@keys_options
@json_option
@handle_errors
def generate(model: Path, plan_path: Path | None, nodes: int | None, shards: int | None,
             replicas: int | None,
             peers: tuple[str, ...], local: bool, device: str, mdns: bool,
             prompts: tuple[str, ...],
             prompts_file: Path | None, system: str | None, no_chat: bool,
             max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             repetition_penalty: float, seed: int, stops: tuple[str, ...], optimize: bool,
             keys: Path | None, insecure: bool, as_json: bool) -> None:
    """Generate text: prefill the prompt, then decode token by token, streaming to stdout.

    Several prompts are generated at once and printed as each ends (with --json, one object
    with a result per prompt and the aggregate rate)."""
    from periphery_core.generate.engine import Sampling, TextCodec, pipeline_step
    from periphery_core.generate.engine import generate as run_generate

    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                        stops)
    sampling.check()
    texts = list(prompts) + _read_prompts(prompts_file)
    if not texts:
        raise PeripheryError("give the text to start from: --prompt TEXT (repeatable) or "
                             "--prompts FILE")

    def stream(piece: str) -> None:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    loaded, spec = open_decoder(model)
    codec = TextCodec(spec.folder)
    prompt_ids = [codec.encode(codec.prompt(t, system, chat=not no_chat)) for t in texts]
    where = where_to_run(loaded, plan_path, shards, replicas, nodes,
                         peers=() if local else peers)
    with deployed(loaded, spec, where, peers, local, mdns, optimize, keys, insecure,
                  device) as pipeline:
        step = pipeline_step(pipeline, spec)
        try:
            if len(prompt_ids) == 1:
                results = [run_generate(step, spec, prompt_ids[0], sampling, codec,
                                        on_text=stream, release=step.release)]
                wall = results[0].ttft_s + results[0].decode_s
            else:
                results, wall = _at_once(step, spec, prompt_ids, sampling, codec, as_json)
        finally:
            step.close()
    model_line = spec.describe()
    from periphery_core.cli.render import print_json

    if len(results) > 1:
        _report_many(results, wall, step.mean_batch, pipeline.plan, model_line, as_json)
        return
    result = results[0]
    summary: dict[str, Any] = {
        "text": result.text, "ids": result.ids, "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens, "finish": result.finish,
        "ttft_s": round(result.ttft_s, 4), "tokens_per_s": round(result.tokens_per_s, 2),
        "decode_bytes_per_token_per_hop": round(result.decode_bytes_per_token_per_hop, 1),
        "stages": pipeline.plan.k, "replicas": pipeline.plan.replicas, "model": model_line,
    }
    if as_json:
        print_json(summary)
    else:
        sys.stdout.write("\n")
        from periphery_core.cli.render import err_console

        err_console.print(
            f"{result.new_tokens} tokens ({result.finish}), first after "
            f"{result.ttft_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s over "
            f"{shape_words(pipeline.plan)}"
            + (f", {result.decode_bytes_per_token_per_hop:.0f} B per token per hop"
               if pipeline.plan.k > 1 else ""), highlight=False)


def _read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PeripheryError(f"cannot read prompts from {path}: {exc}") from None
    return [line.strip() for line in lines if line.strip()]


def _at_once(step: Any, spec: Any, prompt_ids: list[list[int]], sampling: Any, codec: Any,
             as_json: bool) -> tuple[list[Any], float]:
    """Generate every prompt at once (a thread each); print each reply as it ends."""
    import threading
    import time

    from periphery_core.generate.engine import generate as run_generate

    results: list[Any] = [None] * len(prompt_ids)
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            results[i] = run_generate(step, spec, prompt_ids[i], sampling, codec,
                                      release=step.release)
        except Exception as exc:
            results[i] = exc
            return
        if not as_json:
            with lock:
                sys.stdout.write(f"[{i + 1}] {results[i].text.strip()}\n")
                sys.stdout.flush()

    threads = [threading.Thread(target=one, args=(i,), daemon=True)
               for i in range(len(prompt_ids))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results, wall


def shape_words(plan: Any) -> str:
    """The shape a run went over, in words: `2 stages`, `2 replicas of 1 stage`."""
    stages = f"{plan.k} stage{'s' if plan.k != 1 else ''}"
    return stages if plan.replicas == 1 else f"{plan.replicas} replicas of {stages}"


def _report_many(results: list[Any], wall: float, mean_batch: float, plan: Any, model: str,
                 as_json: bool) -> None:
    from periphery_core.cli.render import err_console, print_json

    tokens = sum(r.new_tokens for r in results)
    rate = tokens / wall if wall > 0 else 0.0
    if as_json:
        print_json({
            "results": [{
                "text": r.text, "ids": r.ids, "prompt_tokens": r.prompt_tokens,
                "new_tokens": r.new_tokens, "finish": r.finish, "ttft_s": round(r.ttft_s, 4),
                "tokens_per_s": round(r.tokens_per_s, 2),
                "decode_bytes_per_token_per_hop": round(r.decode_bytes_per_token_per_hop, 1),
            } for r in results],
            "sequences": len(results), "new_tokens": tokens, "wall_s": round(wall, 3),
            "aggregate_tokens_per_s": round(rate, 2),
            "sequences_per_step": round(mean_batch, 2), "stages": plan.k,
            "replicas": plan.replicas, "model": model,
        })
        return
    err_console.print(
        f"{len(results)} sequences, {tokens} tokens in {wall:.2f} s: {rate:.1f} tokens/s "
        f"together over {shape_words(plan)}, {mean_batch:.1f} sequences per decode step",
        highlight=False)


def open_decoder(model: Path) -> tuple[Any, Any]:
    """The model and its DecoderSpec; one line if it is not a decoder Periphery knows."""
    from periphery_core.generate.decoder import recognize
    from periphery_core.model import load_model

    loaded = load_model(model)
    spec = recognize(loaded)
    if spec is None:
        raise PeripheryError(f"{loaded.name} is not a decoder with a KV cache that Periphery "
                             "recognises (GenAI folder, past_key_values.N.key/value, or "
                             "past_N): use 'periphery run' for other models")
    return loaded, spec
