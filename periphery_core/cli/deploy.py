"""Where a model runs, for every command that deploys one (`run`, `serve`, `generate`).

One path for all three: the plan (a file, or K stages and R replicas planned on the nodes
found, with their measured figures), the nodes (local processes, `--peer`, mDNS), the master,
the Pipeline that deploys, streams and recovers, and the cleanup of every one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from periphery_core.cli.cluster import connect_nodes, peer_option
from periphery_core.cli.common import (
    F,
    device_option,
    load_and_analyze,
    local_only,
    tell_pipeline_news,
    warn_cpu_fallback,
)
from periphery_core.errors import PeripheryError


def deploy_options(fn: F) -> F:
    """MODEL and where it runs: --plan, or --nodes, --shards and --replicas; --peer, --local,
    --mdns (what `where_to_run` and `deployed` take)."""
    for option in reversed((
        click.argument("model", type=click.Path(path_type=Path)),
        click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
                     help="A plan file from 'periphery plan' or the app (default: planned "
                          "on the nodes found)."),
        click.option("--nodes", type=int, default=None,
                     help="Nodes to run on, the planner choosing their shape (R replicas of K "
                          "stages) on their measured figures [default: every --peer, else 2, "
                          "unless --shards or --replicas say]."),
        click.option("--shards", "-k", type=int, default=None,
                     help="Stages to plan, forced (1 with --replicas alone)."),
        click.option("--replicas", "-r", type=int, default=None,
                     help="Copies of the K-stage pipeline, each on nodes of its own; a "
                          "sequence stays on one (forced; 1 with --shards alone)."),
        peer_option,
        click.option("--local", is_flag=True,
                     help="Start the nodes as processes on this machine (--nodes of them, or "
                          "one per stage of every replica)."),
        device_option,
        click.option("--mdns/--no-mdns", default=True, show_default=True,
                     help="Find nodes over mDNS when --peer and --local give too few."),
    )):
        fn = option(fn)
    return fn


@dataclass(frozen=True)
class Where:
    """What a command deploys: a plan file's plan (None: planned on the nodes once found), the
    stages and replicas forced (None: the planner's choice), the nodes it runs on, and the
    model's analysis at the shapes it runs at."""

    plan: Any  # ShardPlan | None
    k: int | None
    replicas: int | None
    nodes: int
    analysis: Any  # ModelAnalysis


DEFAULT_NODES = 2  # with neither a plan, a shape nor --peer: two nodes, shaped by the planner


def where_to_run(loaded: Any, plan_path: Path | None, shards: int | None,
                 replicas: int | None, nodes: int | None = None,
                 input_shapes: tuple[str, ...] = (), inputs: Path | None = None,
                 peers: tuple[str, ...] = ()) -> Where:
    """The plan file read and checked against the model (or the nodes, stages and replicas
    asked for; by default every node given by --peer, else two), and the model analysed at
    the plan's shapes under the user's: every mistake found before a node starts."""
    from periphery_core.model.shapes import overlay_shapes, parse_input_shapes
    from periphery_core.partition.plan import load_plan, require_plan_for

    if plan_path is not None and (shards, replicas, nodes) != (None, None, None):
        raise PeripheryError("give --plan or --nodes/--shards/--replicas, not both")
    for value, what in ((shards, "--shards"), (replicas, "--replicas"), (nodes, "--nodes")):
        if value is not None and value < 1:
            raise PeripheryError(f"{what} must be at least 1")
    if nodes is not None and shards is not None and replicas is not None \
            and shards * replicas != nodes:
        raise PeripheryError(f"--shards {shards} x --replicas {replicas} runs on "
                             f"{shards * replicas} nodes, not --nodes {nodes}: give two of them")
    if nodes is not None and nodes < max(shards or 1, replicas or 1):
        raise PeripheryError(f"--nodes {nodes} is too few for "
                             f"{'--shards' if (shards or 1) > nodes else '--replicas'} "
                             f"{max(shards or 1, replicas or 1)}")
    plan = load_plan(plan_path) if plan_path is not None else None
    if plan is not None:
        require_plan_for(plan, loaded.sha256, loaded.name, str(plan_path))
    shapes = overlay_shapes(loaded, plan.input_shapes if plan is not None else {},
                            parse_input_shapes(input_shapes))
    _, analysis = load_and_analyze(loaded, shapes, inputs=inputs)
    most = len(analysis.nodes)  # a stage holds one operator at least
    if plan is None and shards is not None and shards > most:
        raise PeripheryError(f"--shards {shards}: {loaded.name} has {most} operators, so it "
                             f"cuts into {most} stages at most: ask for at most {most}")
    if plan is not None:
        return Where(plan, plan.k, plan.replicas, plan.nodes_needed, analysis)
    if nodes is None and (shards is not None or replicas is not None):
        # a shape forced: K stages of one pipeline, or R replicas of one stage, or both
        shards, replicas = shards or 1, replicas or 1
        return Where(None, shards, replicas, shards * replicas, analysis)
    count = nodes or len(set(peers)) or DEFAULT_NODES
    if shards is not None and replicas is None:  # K stages on N nodes: as many copies as fit
        replicas = count // shards
    return Where(None, shards, replicas, count, analysis)


@contextlib.contextmanager
def deployed(loaded: Any, spec: Any, where: Where, peers: tuple[str, ...], local: bool,
             mdns: bool, optimize: bool, keys: Path | None, insecure: bool,
             device: str = "cpu", *, workers: int | None = None, rebalance: bool = True,
             on_master: Callable[[Any, contextlib.ExitStack], None] | None = None,
             news: Callable[[Any], None] = tell_pipeline_news) -> Iterator[Any]:
    """The model deployed (on local node processes, or on the nodes given or found): a decoder
    LLM (`spec` its DecoderSpec) as stateful stages, any other model (`spec` None) as plain
    ones; yields the Pipeline, and stops what it started on the way out, whatever happens.

    `on_master(master, stack)` runs before the deploy (to watch its bus from the start; what
    it puts on `stack` is undone before the nodes stop); `news` says what happens to the
    pipeline as it serves (a recovery, a rebalance) on stderr."""
    from periphery_core.cluster.events import StageReady
    from periphery_core.cluster.keys import keyring_or_insecure
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.master import Master
    from periphery_core.cluster.pipeline import Pipeline

    local_only(local, device, workers, peers, keys)
    cluster_ctx = LocalCluster(where.nodes, secure=not insecure, device=device,
                               workers=workers) if local else None
    ring = None if local else keyring_or_insecure(keys, insecure)
    with contextlib.ExitStack() as stack:
        if cluster_ctx is not None:
            stack.callback(cluster_ctx.stop)
            cluster_ctx.start()
            ring = cluster_ctx.master_keys
        master = stack.enter_context(Master(keys=ring))
        stack.callback(master.bus.subscribe(news))
        if on_master is not None:
            on_master(master, stack)
        names = where.plan.device_order if where.plan is not None else []
        chosen = connect_nodes(master, cluster_ctx, peers, mdns, where.nodes, names)
        if cluster_ctx is not None:  # a local node that dies is started again, and said
            cluster_ctx.watch(master.bus.publish)
        # The one serving path: a lost node is re-planned around and its requests replayed.
        pipeline = Pipeline(master, loaded, where.analysis, k=where.k, replicas=where.replicas,
                            plan=where.plan, exact=not optimize, decoder=spec,
                            rebalance=rebalance)
        stack.callback(pipeline.close)
        ready: list[tuple[int, str | None]] = []  # what each slot runs on, as nodes say
        stop_watching = master.bus.subscribe(
            lambda e: ready.append((e.stage, e.provider)) if isinstance(e, StageReady) else None)
        plan = pipeline.deploy([h.node_id for h in chosen])
        stop_watching()
        warn_cpu_fallback(device, [(slot % plan.k, provider) for slot, provider in ready])
        if where.plan is None and plan.shape_reason:  # the shape it chose for them, and why
            from periphery_core.cli.render import err_console

            err_console.print(f"planned on {where.nodes} node{'s' if where.nodes != 1 else ''}: "
                              f"{plan.shape_reason}",
                              highlight=False)
        yield pipeline
