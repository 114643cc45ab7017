"""`periphery cluster up|ls` and `periphery run`: the cluster from the command line."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from periphery_core.cli.common import (
    F,
    cli,
    device_option,
    device_option_for,
    handle_errors,
    input_shape_option,
    json_option,
    local_only,
    tell_pipeline_news,
    warn_cpu_fallback,
    workers_option,
    workers_option_for,
)
from periphery_core.discovery import NodeAddress
from periphery_core.errors import PeripheryError

if TYPE_CHECKING:  # imported where used: `periphery --help` stays quick
    from periphery_core.cluster.state import ClusterState


@cli.group()
def cluster() -> None:
    """Start a local cluster or list the nodes on the network."""


@cluster.command("up")
@click.option("--nodes", "-n", default=3, show_default=True, help="Node processes to start.")
@click.option("--advertise/--no-advertise", default=True, show_default=True,
              help="Advertise the nodes over mDNS (on the loopback interface).")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime threads per node (default: the cores shared out among them).")
@click.option("--insecure", is_flag=True, help="Start the nodes without keys.")
@click.option("--restart", is_flag=True,
              help="Start a node that dies again at its port, with its name and keys (up to "
                   "3 times a minute each), as a service manager would.")
@device_option_for("the nodes")
@workers_option_for("the nodes")
@handle_errors
def cluster_up(nodes: int, advertise: bool, threads: int | None, insecure: bool,
               restart: bool, device: str, workers: int | None) -> None:
    """Start N periphery-node processes on this machine; Ctrl-C or SIGTERM stops them cleanly.

    Unless --insecure, the nodes get fresh keys; the master's key folder is printed, for
    'periphery run --keys' and 'periphery cluster ls --keys' while the cluster is up. The nodes
    never outlive this command, however it ends; a node that dies is reported and the others
    keep serving, and with --restart it is started again at its address (a master serving on
    the cluster takes it back into its pipeline).
    """
    # Ctrl-C, SIGTERM and SIGHUP (unless ignored, as under nohup) stop the nodes, remove the
    # keys and exit 0 after "stopping". SIGKILL cannot be caught: the nodes' parent watchdog
    # and parent-death signal stop them then (see periphery_core.cli.node).
    from periphery_core.cli.render import console, err_console
    from periphery_core.cluster.events import describe
    from periphery_core.cluster.local import LocalCluster

    local_only(True, device, workers)

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # leave the with-block below: the nodes stop cleanly

    previous = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        with LocalCluster(nodes, advertise=advertise, threads=threads,
                          secure=not insecure, device=device, workers=workers) as local:
            for n in local.nodes:
                console.print(f"{n.address.name}  --peer {n.address.host}:{n.address.port}  "
                              f"id {n.address.node_id[:12]}")
            if local.keys_dir is not None:
                console.print(f"master keys: --keys {local.keys_dir / 'master'}")
            console.print(f"{nodes} nodes up; Ctrl-C stops them")
            try:
                while True:
                    for e in local.tend(restart):
                        err_console.print(describe(e.event(local.alive())), soft_wrap=True,
                                          highlight=False)
                    if not local.alive():
                        raise PeripheryError("every local node has exited")
                    time.sleep(0.5)
            except KeyboardInterrupt:
                console.print("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _gather(peers: tuple[str, ...], mdns: bool, timeout: float, interfaces: tuple[str, ...],
            want: int | None = None) -> list[NodeAddress]:
    """Static peers, then nodes found over mDNS: all found within `timeout`, or as soon as
    `want` nodes are known in all."""
    from periphery_core.discovery.combined import discovery_for

    discovery = discovery_for(peers, mdns=mdns, interfaces=interfaces)
    discovery.start()
    try:
        return discovery.wait_for(want, timeout)
    finally:
        discovery.stop()


peer_option = click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
                           help="A node by address, for networks without multicast (repeatable).")


def keys_options(fn: F) -> F:
    fn = click.option("--insecure", is_flag=True,
                      help="Talk to nodes without authentication or encryption.")(fn)
    return click.option("--keys", type=click.Path(path_type=Path), default=None,
                        help="This master's key folder from 'periphery keys init' (default: "
                             "$PERIPHERY_KEYS, else keys/ in the config folder: "
                             "$PERIPHERY_CONFIG_DIR or ~/.config/periphery).")(fn)


@cli.group()
def keys() -> None:
    """Create the cluster's CurveZMQ keys."""


@keys.command("init")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--master", "masters", multiple=True, required=True,
              help="A master host: may deploy to and control the nodes (repeatable).")
@click.option("--node", "nodes", multiple=True, required=True,
              help="A node host: may only send activations to other nodes and results to "
                   "masters (repeatable).")
@handle_errors
def keys_init(folder: Path, masters: tuple[str, ...], nodes: tuple[str, ...]) -> None:
    """Write one key folder per host into FOLDER, trusting the others by role.

    Copy FOLDER/<host> to each host and pass it with --keys (or set PERIPHERY_KEYS). Each
    secret key is readable by its owner only; keep it so.
    """
    from periphery_core.cluster.keys import init_cluster_keys

    for path in init_cluster_keys(folder, masters, nodes):
        click.echo(f"wrote {path}  (secret: {path / (path.name + '.key_secret')})")


@cluster.command("ls")
@peer_option
@click.option("--mdns/--no-mdns", default=True, show_default=True, help="Browse mDNS.")
@click.option("--mdns-interface", "interfaces", multiple=True,
              help="Browse only on these interface addresses.")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to browse.")
@click.option("--write-devices", type=click.Path(path_type=Path), default=None,
              help="Write the nodes' measured speed, memory and link as a devices file for "
                   "'periphery plan --devices'.")
@keys_options
@json_option
@handle_errors
def cluster_ls(peers: tuple[str, ...], mdns: bool, interfaces: tuple[str, ...], timeout: float,
               write_devices: Path | None, keys: Path | None, insecure: bool,
               as_json: bool) -> None:
    """List nodes (mDNS and --peer) with device, speed and link figures."""
    from periphery_core.cli.render import print_json, render_nodes
    from periphery_core.cluster.keys import keyring_or_insecure
    from periphery_core.cluster.master import Master

    ring = keyring_or_insecure(keys, insecure)
    addresses = _gather(peers, mdns, timeout, interfaces)
    rows: list[dict[str, Any]] = []
    with Master(keys=ring) as master:
        for a in addresses:
            try:
                h = master.connect(a)
            except PeripheryError as exc:  # unreachable, or a key not trusted: list, go on
                rows.append({"address": f"{a.host}:{a.port}", "error": exc.message})
                continue
            rows.append({"name": h.name, "id": h.node_id, "address": f"{a.host}:{a.port}",
                         "source": a.source, "device": h.device, "cores": h.cores,
                         "workers": h.workers, "memory": h.memory, "speed": h.speed,
                         "rtt_s": h.rtt_s, "bandwidth": h.bandwidth})
        if write_devices is not None:
            _write_devices(write_devices, master.devices())
    if as_json:
        print_json(rows)
        return
    render_nodes(rows)


def _write_devices(path: Path, devices: list) -> None:
    import json

    import tomli_w

    table = {"device": [
        {"name": d.name, "speed": round(d.speed, 3), "bandwidth": float(d.bandwidth),
         **({"memory": d.memory_bytes} if d.memory_bytes else {}),
         **({"workers": d.workers} if d.workers != 1 else {})} for d in devices]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(table) if path.suffix.lower() == ".toml"
                    else json.dumps(table, indent=1) + "\n")


def connect_nodes(master: Any, cluster_ctx: Any, peers: tuple[str, ...], mdns: bool, k: int,
                  names: Sequence[str] = ()) -> list[Any]:
    """Connect K nodes for the stages: the local cluster's, then --peer, then mDNS; in the
    order of `names` (a plan's devices) when every one is found."""
    from periphery_core.cli.render import err_console

    addresses = list(cluster_ctx.addresses) if cluster_ctx else []
    if len(addresses) < k:
        addresses += _gather(peers, mdns and len(peers) < k, 2.0, (), want=k - len(addresses))
    handles: list[Any] = []
    for a in addresses:
        if len(handles) == k:
            break
        try:
            handles.append(master.connect(a))
        except PeripheryError as exc:  # one bad candidate must not end the run
            err_console.print(f"skipping node {a.host}:{a.port}: {exc.message}",
                              soft_wrap=True)
    if len(handles) < k:
        raise PeripheryError(
            f"the plan needs {k} nodes but {len(handles)} nodes were found: start "
            "nodes with 'periphery-node', pass --peer HOST:PORT, or use --local")
    by_name = {h.name: h for h in handles}
    if names and all(n in by_name for n in names):  # the plan's devices first, in its order
        return [by_name[n] for n in names] + [h for h in handles if h.name not in names]
    return handles


@cli.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True,
              help="A plan file from 'periphery plan' or the app.")
@peer_option
@click.option("--local", "local", is_flag=True,
              help="Start one local node process per stage (no other nodes needed).")
@device_option
@workers_option
@click.option("--mdns/--no-mdns", default=True, show_default=True,
              help="Find nodes over mDNS when --peer and --local give too few.")
@click.option("--requests", "-n", "count", default=100, show_default=True)
@click.option("--inflight", "-m", default=4, show_default=True, help="Requests in flight.")
@click.option("--micro-batch", type=int, default=None,
              help="Split each request's batch into micro-batches of this size.")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
              help="A .npz with one array per model input (default: seeded random data).")
@click.option("--check", is_flag=True,
              help="Compare every result with the unsharded model (within tolerance; bit for "
                   "bit with --exact); exit 1 on a difference.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics while running.")
@click.option("--optimize/--exact", default=True, show_default=True,
              help="Graph optimizations on the nodes (fast), or off (bit-exact).")
@click.option("--rebalance/--no-rebalance", default=True, show_default=True,
              help="Move the plan's cuts on the nodes' measured compute while serving.")
@keys_options
@input_shape_option
@json_option
@handle_errors
def run(model: Path, plan_path: Path, peers: tuple[str, ...], local: bool, device: str,
        workers: int | None, mdns: bool, count: int, inflight: int, micro_batch: int | None,
        inputs_path: Path | None,
        check: bool, metrics_port: int | None, optimize: bool, rebalance: bool,
        keys: Path | None, insecure: bool, input_shapes: tuple[str, ...],
        as_json: bool) -> None:
    """Deploy a plan to nodes, stream requests through the pipeline, report latency."""
    from periphery_core.cli.common import load_and_analyze
    from periphery_core.cli.render import console, err_console, print_json
    from periphery_core.cluster import events as ev
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.master import Master
    from periphery_core.cluster.pipeline import Pipeline
    from periphery_core.cluster.state import ClusterState
    from periphery_core.cluster.tracker import StateTracker
    from periphery_core.model import load_model
    from periphery_core.model.shapes import (
        overlay_shapes,
        parse_input_shapes,
    )
    from periphery_core.partition.plan import load_plan, require_plan_for
    from periphery_core.partition.verify import compare
    from periphery_core.runtime.feeds import load_npz, random_feeds
    from periphery_core.runtime.gpu import providers_for
    from periphery_core.runtime.session import SessionConfig, make_session

    if count < 1 or inflight < 1:
        raise PeripheryError("--requests and --inflight must be at least 1")
    local_only(local, device, workers)
    plan = load_plan(plan_path)
    loaded = load_model(model)
    require_plan_for(plan, loaded.sha256, loaded.name, str(plan_path))
    shapes = overlay_shapes(loaded, plan.input_shapes, parse_input_shapes(input_shapes))
    _, analysis = load_and_analyze(loaded, shapes, inputs=inputs_path)
    specs = list(analysis.inputs)
    if inputs_path is not None:
        requests = [load_npz(inputs_path, specs)] * count
    else:
        pool = [random_feeds(specs, seed=i) for i in range(min(count, 8))]
        requests = [pool[i % len(pool)] for i in range(count)]
    exact = not optimize
    recoveries: list[ev.Recovered | ev.SpreadBack] = []
    rebalances: list[ev.Rebalanced] = []
    from periphery_core.cluster.keys import keyring_or_insecure

    cluster_ctx = LocalCluster(plan.nodes_needed, secure=not insecure, device=device,
                               workers=workers) if local else None
    ring = None if local else keyring_or_insecure(keys, insecure)
    stack = contextlib.ExitStack()
    try:
        if cluster_ctx is not None:
            cluster_ctx.start()
            ring = cluster_ctx.master_keys
        with Master(keys=ring) as master:
            # The summary's figures are the fold's, its latency window the whole run.
            run_view = StateTracker(master.bus, ClusterState.empty(window_s=math.inf))
            stack.callback(run_view.close)

            def on_event(e: ev.Event) -> None:
                if isinstance(e, (ev.Recovered, ev.SpreadBack)):
                    recoveries.append(e)
                if isinstance(e, ev.Rebalanced):
                    rebalances.append(e)
                tell_pipeline_news(e, failures=False)  # (a failed recovery is run's error)

            master.bus.subscribe(on_event)
            if metrics_port is not None:
                from periphery_core.cluster.exporter import MetricsServer

                server = MetricsServer(StateTracker(master.bus), metrics_port)
                stack.callback(server.close)
                err_console.print(f"metrics on http://127.0.0.1:{server.port}/metrics")
            chosen = connect_nodes(master, cluster_ctx, peers, mdns, plan.nodes_needed,
                                   plan.device_order)
            if cluster_ctx is not None:  # a local node that dies is started again, and said
                cluster_ctx.watch(master.bus.publish)
            # The one serving path: a lost node is re-planned around and its requests replayed.
            pipeline = Pipeline(master, loaded, analysis, plan=plan, exact=exact,
                                rebalance=rebalance)
            stack.callback(pipeline.close)
            pipeline.deploy([h.node_id for h in chosen])
            t0 = time.perf_counter()
            if micro_batch:
                results = [pipeline.submit_batch(r, micro_batch).result() for r in requests]
            else:
                results = list(pipeline.run_many(requests, inflight=inflight))
            wall = time.perf_counter() - t0
            # per slot, how many requests its node computes at once (periphery-node --workers)
            computes_at_once = [h.workers if (h := master.nodes.get(n)) is not None else 1
                                for n in pipeline.assignment]
    finally:
        stack.close()
        if cluster_ctx is not None:
            cluster_ctx.stop()
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
                        console.print(f"[red]request {i} output {name} differs: max abs "
                                      f"{c.max_abs:.3g}[/]", soft_wrap=True)
    summary = {"shape": pipeline.plan.shape if pipeline.plan else plan.shape,
               **_summary(run_view.state, wall, count)}
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
    warn_cpu_fallback(device, [(s["stage"], s["provider"]) for s in summary["stages"]])
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
        console.print(f"[bold green]check: every result matches the unsharded model {how}; "
                      f"{c['bit_identical_outputs']} outputs bit-identical[/]" if c["passed"]
                      else f"[bold red]check: {c['mismatches']} outputs differ from the unsharded "
                           f"model ({c['mode']})[/]")
