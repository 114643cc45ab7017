"""`periphery run`: stream requests through a model deployed on the cluster, report latency
and check every result against the unsharded model."""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from periphery_core.cli.cluster import keys_options
from periphery_core.cli.common import (
    cli,
    handle_errors,
    input_shape_option,
    json_option,
    tell_pipeline_news,
    workers_option,
)
from periphery_core.cli.deploy import deploy_options, deployed, where_to_run
from periphery_core.errors import PeripheryError

if TYPE_CHECKING:  # imported where used: `periphery --help` stays quick
    from periphery_core.cluster.state import ClusterState


@cli.command("run")
@deploy_options
@workers_option
@click.option("--requests", "-n", "count", default=100, show_default=True)
@click.option("--inflight", "-m", default=4, show_default=True, help="Requests in flight.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Split each request's batch into micro-batches of this size.")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
              help="A .npz with one array per model input (default: seeded random data).")
@click.option("--check", is_flag=True,
              help="Compare every result with the unsharded model (within tolerance; bit for "
                   "bit with --exact); exit 1 on a difference.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics while running.")
@click.option("--optimize/--exact", default=True, show_default=True,
              help="Graph optimizations on the nodes (fast), or off (bit-exact).")
@click.option("--rebalance/--no-rebalance", default=True, show_default=True,
              help="Move the plan's cuts on the nodes' measured compute while serving.")
@keys_options
@input_shape_option
@json_option
@handle_errors
def run(model: Path, plan_path: Path | None, nodes: int | None, shards: int | None,
        replicas: int | None,
        peers: tuple[str, ...], local: bool, device: str, mdns: bool, workers: int | None,
        count: int, inflight: int, micro_batch: int | None, inputs_path: Path | None,
        check: bool, metrics_port: int | None, optimize: bool, rebalance: bool,
        keys: Path | None, insecure: bool, input_shapes: tuple[str, ...],
        as_json: bool) -> None:
    """Deploy a model on nodes (a plan file's, or planned on the nodes found: the shape the
    planner chooses for them, or the stages and replicas given), stream requests through
    it, report latency."""
    from periphery_core.cli.render import console, err_console, print_json
    from periphery_core.cluster import events as ev
    from periphery_core.cluster.state import ClusterState
    from periphery_core.cluster.tracker import StateTracker
    from periphery_core.model import load_model
    from periphery_core.partition.verify import compare
    from periphery_core.runtime.feeds import load_npz, random_feeds
    from periphery_core.runtime.gpu import providers_for
    from periphery_core.runtime.session import SessionConfig, make_session

    if count < 1 or inflight < 1:
        raise PeripheryError("--requests and --inflight must be at least 1")
    loaded = load_model(model)
    where = where_to_run(loaded, plan_path, shards, replicas, nodes, input_shapes,
                         inputs_path, () if local else peers)
    specs = list(where.analysis.inputs)
    if inputs_path is not None:
        requests = [load_npz(inputs_path, specs)] * count
    else:
        pool = [random_feeds(specs, seed=i) for i in range(min(count, 8))]
        requests = [pool[i % len(pool)] for i in range(count)]
    exact = not optimize
    recoveries: list[ev.Recovered | ev.SpreadBack] = []
    rebalances: list[ev.Rebalanced] = []
    views: list[StateTracker] = []

    def on_event(e: ev.Event) -> None:
        if isinstance(e, (ev.Recovered, ev.SpreadBack)):
            recoveries.append(e)
        if isinstance(e, ev.Rebalanced):
            rebalances.append(e)
        tell_pipeline_news(e, failures=False)  # (a failed recovery is run's error)

    def watch(master: Any, stack: contextlib.ExitStack) -> None:
        # The summary's figures are the fold's, its latency window the whole run.
        views.append(StateTracker(master.bus, ClusterState.empty(window_s=math.inf)))
        stack.callback(views[0].close)
        if metrics_port is not None:
            from periphery_core.cluster.exporter import MetricsServer

            server = MetricsServer(StateTracker(master.bus), metrics_port)
            stack.callback(server.close)
            err_console.print(f"metrics on http://127.0.0.1:{server.port}/metrics")

    with deployed(loaded, None, where, peers, local, mdns, optimize, keys, insecure, device,
                  workers=workers, rebalance=rebalance, on_master=watch,
                  news=on_event) as pipeline:
        t0 = time.perf_counter()
        if micro_batch:  # --inflight requests at a time, each split into micro-batches
            results, waiting = [], collections.deque[Any]()
            for r in requests:
                if len(waiting) >= inflight:
                    results.append(waiting.popleft().result())
                waiting.append(pipeline.submit_batch(r, micro_batch))
            results += [f.result() for f in waiting]
        else:
            results = list(pipeline.run_many(requests, inflight=inflight))
        wall = time.perf_counter() - t0
        # per slot, how many requests its node computes at once (periphery-node --workers)
        computes_at_once = [h.workers if (h := pipeline.master.nodes.get(n)) is not None else 1
                            for n in pipeline.assignment]
    run_view = views[0]
    mismatches = identical = 0
    if check:
        # the unsharded model on what the nodes ran on: a GPU's kernels (TF32) differ from
        # the CPU's by more than sharding ever does
        # (a model with a data file from its file, as `verify` does: one of 2 GiB or more
        # cannot be handed to ONNX Runtime from memory)
        sess = make_session(str(loaded.path) if loaded.has_external_data else loaded.proto,
                            SessionConfig(exact=exact, providers=providers_for(device)))
        names_out = [o.name for o in sess.get_outputs()]
        refs: dict[int, list[np.ndarray]] = {}
        for i, (feeds, got) in enumerate(zip(requests, results, strict=True)):
            key = id(feeds)
            if key not in refs:
                refs[key] = sess.run(names_out, dict(feeds))
            for name, ref in zip(names_out, refs[key], strict=True):
                c = compare(name, ref, got[name])
                identical += c.bit_identical
                if not (c.bit_identical or (c.within_tolerance and not exact)):
                    mismatches += 1
                    if mismatches <= 3:
                        console.print(f"request {i} output {name} differs: max abs "
                                      f"{c.max_abs:.3g}", soft_wrap=True, style="red")
    assert pipeline.plan is not None
    summary = {"shape": pipeline.plan.shape, **_summary(run_view.state, wall, count)}
    for stage, at_once in zip(summary["stages"], computes_at_once, strict=False):
        stage["workers"] = at_once
    summary["recoveries"] = [
        {"lost": list(r.lost), "detected_s": r.detected_s, "recovered_s": r.recovered_s,
         "replayed": r.replayed, "stages": list(r.assignment)} for r in recoveries
        if isinstance(r, ev.Recovered)]
    # after a recovery, the nodes that joined again and the nodes it spread back over
    summary["spread_back"] = [{"joined": list(r.joined), "replayed": r.replayed,
                               "stages": list(r.assignment)} for r in recoveries
                              if isinstance(r, ev.SpreadBack)]
    summary["rebalances"] = [
        {"measured_s": list(r.measured_s), "before": list(r.before), "after": list(r.after),
         "predicted_s": r.predicted_s, "replayed": r.replayed} for r in rebalances]
    summary["check"] = None if not check else {
        "mismatches": mismatches, "bit_identical_outputs": identical, "passed": mismatches == 0,
        "mode": "bit-identical" if exact else "within tolerance",
    }
    if as_json:
        print_json(summary)
    else:
        _render_run(summary)
    if check and mismatches:
        sys.exit(1)


def _summary(state: ClusterState, wall: float, count: int) -> dict[str, Any]:
    """The run's figures, from the fold of its events (a latency window as long as the run):
    latency percentiles over its completed requests (the newest `LatencyWindow.max_samples`),
    and each stage's medians over its recent requests, for the pipeline serving at the end (a
    recovery re-plans it, and the fold starts its stage timings afresh)."""
    stages = []
    k = max(1, state.plan_stages)
    for s in range(len(state.assignment)):  # each replica's stages, by slot
        summary = state.stage_stats.summary(s)
        stages.append({
            "stage": s % k,
            "replica": s // k,
            "queue_s": summary.queue_median if summary else None,
            "compute_s": summary.compute_median if summary else None,
            "transfer_s": summary.transfer_median if summary else None,
            # how its outputs travel: a private socket on its host, or TCP (same_host.py)
            "link": state.links[s] if s < len(state.links) else None,
            # the execution provider its node runs it with (CUDA, or the CPU it fell back to)
            "provider": state.deploy[s].provider if s < len(state.deploy) else None,
        })
    return {"requests": count, "completed": state.requests_completed, "wall_s": wall,
            "throughput_rps": count / wall if wall > 0 else None,
            "latency_s": state.latency(state.clock or 0.0), "stages": stages}


_LINKS = {"ipc": "its host (socket, shared memory)", "tcp": "TCP"}


def _render_run(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from periphery_core.cli.render import console, human_seconds

    lat = summary["latency_s"]
    console.print(f"{summary['completed']}/{summary['requests']} requests in "
                  f"{summary['wall_s']:.2f} s: {summary['throughput_rps']:.1f} req/s; latency "
                  f"p50 {human_seconds(lat['p50'])}, p90 {human_seconds(lat['p90'])}, "
                  f"p99 {human_seconds(lat['p99'])}")
    replicas = len({s["replica"] for s in summary["stages"]}) > 1
    t = Table(title=f"{summary['shape']}: per stage (medians)", title_justify="left")
    for col in ("replica", "stage", "queue", "compute", "transfer")[0 if replicas else 1:]:
        t.add_column(col, justify="right")
    t.add_column("runs on")
    t.add_column("sends over")
    for s in summary["stages"]:
        t.add_row(*([str(s["replica"])] if replicas else []), str(s["stage"]),
                  *(human_seconds(s[k]) if s[k] is not None else "-"
                    for k in ("queue_s", "compute_s", "transfer_s")),
                  (s.get("provider") or "-").removesuffix("ExecutionProvider")
                  + (f", {s['workers']} at once" if s.get("workers", 1) > 1 else ""),
                  _LINKS.get(s.get("link") or "", "-"))
    console.print(t)
    for r in summary.get("recoveries", []):
        detected = "" if r["detected_s"] is None else f"detected after {r['detected_s']:.2f} s, "
        console.print(f"recovered from losing {', '.join(r['lost'])}: {detected}serving again "
                      f"{r['recovered_s']:.2f} s later on {len(r['stages'])} "
                      f"node{'s' if len(r['stages']) != 1 else ''}, "
                      f"{r['replayed']} requests replayed")
    for r in summary.get("spread_back", []):
        console.print(f"spread back over {len(r['stages'])} nodes once {', '.join(r['joined'])} "
                      f"joined, {r['replayed']} requests replayed")
    if summary["check"] is not None:
        c = summary["check"]
        from periphery_core.partition.verify import ATOL, RTOL

        how = ("bit for bit (--exact)" if c["mode"] == "bit-identical" else
               f"within tolerance (rtol {RTOL:g}, atol {ATOL:g}; --exact checks bit for bit)")
        console.print(f"check: every result matches the unsharded model {how}; "
                      f"{c['bit_identical_outputs']} outputs bit-identical" if c["passed"]
                      else f"check: {c['mismatches']} outputs differ from the unsharded "
                           f"model ({c['mode']})",
                      style="bold green" if c["passed"] else "bold red")
