"""`periphery generate`: text from a decoder LLM split over nodes that keep their KV caches."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from periphery_core.cli.cluster import connect_nodes, keys_options, peer_option
from periphery_core.cli.common import cli, handle_errors, json_option
from periphery_core.errors import PeripheryError


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="A plan file for the model (default: plan --shards K stages).")
@click.option("--shards", "-k", type=int, default=None, help="Stages to plan (default 2).")
@peer_option
@click.option("--local", is_flag=True, help="Start one local node process per stage.")
@click.option("--mdns/--no-mdns", default=True, show_default=True,
              help="Find nodes over mDNS when --peer and --local give too few.")
@click.option("--prompt", required=True, help="What to ask (or the text to continue).")
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
def generate(model: Path, plan_path: Path | None, shards: int | None, peers: tuple[str, ...],
             local: bool, mdns: bool, prompt: str, system: str | None, no_chat: bool,
             max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             repetition_penalty: float, seed: int, stops: tuple[str, ...], optimize: bool,
             keys: Path | None, insecure: bool, as_json: bool) -> None:
    """Generate text: prefill the prompt, then decode token by token, streaming to stdout."""
    from periphery_core.cli.render import print_json
    from periphery_core.cluster.keys import keyring_or_insecure
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.master import Master
    from periphery_core.cluster.pipeline import Pipeline
    from periphery_core.generate.decoder import recognize
    from periphery_core.generate.engine import (
        Sampling,
        TextCodec,
        pipeline_step,
    )
    from periphery_core.generate.engine import (
        generate as run_generate,
    )
    from periphery_core.model import analyze, load_model
    from periphery_core.partition.plan import load_plan, require_plan_for

    loaded = load_model(model)
    spec = recognize(loaded)
    if spec is None:
        raise PeripheryError(f"{loaded.name} is not a decoder with a KV cache that Periphery "
                             "recognises (GenAI folder, past_key_values.N.key/value, or "
                             "past_N): use 'periphery run' for other models")
    if plan_path is not None and shards is not None:
        raise PeripheryError("give --plan or --shards, not both")
    plan = load_plan(plan_path) if plan_path is not None else None
    if plan is not None:
        require_plan_for(plan, loaded.sha256, loaded.name, str(plan_path))
    k = plan.k if plan is not None else (shards or 2)
    if k < 1:
        raise PeripheryError("--shards must be at least 1")
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                        stops)
    sampling.check()
    codec = TextCodec(spec.folder)
    prompt_ids = codec.encode(codec.prompt(prompt, system, chat=not no_chat))
    analysis = analyze(loaded)
    # Local nodes share this machine's cores evenly.
    threads = max(1, (os.cpu_count() or 1) // k)
    cluster_ctx = LocalCluster(k, secure=not insecure, threads=threads) if local else None
    ring = None if local else keyring_or_insecure(keys, insecure)
    stack = contextlib.ExitStack()

    def stream(piece: str) -> None:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    try:
        if cluster_ctx is not None:
            cluster_ctx.start()
            ring = cluster_ctx.master_keys
        master = stack.enter_context(Master(keys=ring))
        names = [d.name for d in plan.devices] if plan is not None else []
        chosen = connect_nodes(master, cluster_ctx, peers, mdns, k, names)
        pipeline = Pipeline(master, loaded, analysis, k=k, plan=plan, exact=not optimize,
                            decoder=spec)
        stack.callback(pipeline.close)
        pipeline.deploy([h.node_id for h in chosen])
        result = run_generate(pipeline_step(pipeline, spec), spec, prompt_ids, sampling, codec,
                              on_text=stream,
                              release=lambda seq: master.release_sequences([seq]))
    finally:
        stack.close()
        if cluster_ctx is not None:
            cluster_ctx.stop()
    summary: dict[str, Any] = {
        "text": result.text, "ids": result.ids, "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens, "finish": result.finish,
        "ttft_s": round(result.ttft_s, 4), "tokens_per_s": round(result.tokens_per_s, 2),
        "decode_bytes_per_token_per_hop": round(result.decode_bytes_per_token_per_hop, 1),
        "stages": k, "model": spec.describe(),
    }
    if as_json:
        print_json(summary)
    else:
        sys.stdout.write("\n")
        from periphery_core.cli.render import err_console

        err_console.print(
            f"{result.new_tokens} tokens ({result.finish}), first after "
            f"{result.ttft_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s over {k} "
            f"stages, {result.decode_bytes_per_token_per_hop:.0f} B per token per hop",
            highlight=False)
