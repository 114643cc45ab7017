"""Periphery's pipeline against what a user would otherwise run, and what one hop costs.

1. Throughput on the demo model (assets/demo-resnet.onnx), side by side in one run, each
   configuration measured --repeat times in turn (medians):
   - plain ONNX Runtime, one process with every core (a loop of `session.run`, as a user's
     script would do);
   - plain ONNX Runtime replicas: one process per core with one thread each, the requests
     split between them;
   - Periphery K = 1, 2, 3 on local node processes with default flags (graph optimizations on,
     CurveZMQ keys, the cores shared out among the nodes, links on this host's private
     sockets with big tensors in shared memory), 8 requests in flight; K = 1 on one node that
     computes one request per core at once, a thread each (`--workers`); and K = 2 with every
     link on CurveZMQ TCP, as between hosts;
   - Periphery with the shape its planner picks for one node per core (R replicas of K stages,
     `partition.shape`), the same defaults.
   Each row's ratio is against plain ONNX Runtime in one process. Pipeline efficiency is
   throughput x the slowest stage's mean compute per request / (replicas x workers): the
   share of the time that stage computes (its utilization; 1.0 when it never waits for work).
   The mean, not the median: a stage's capacity is one over its mean service time, and a run
   slowed by a thread that took the core meanwhile occupies the stage all the same. Master CPU
   per request is this process's CPU time (the master's threads and the loop submitting to
   it) over the timed requests: what the master takes from the cores it shares with the nodes
   here. CPU per request of every process (plain ONNX Runtime's, its replicas', or the master's
   and the nodes') says where the cores went: a run that keeps every core busy serves at most
   cores / that figure.
2. What one hop adds: a 2-Relu model over a 4 KiB, 1 MiB and 8 MiB activation, one request at a
   time, latency(K = 2) - latency(K = 1), against a bare ZeroMQ round trip of the same bytes
   between two processes; every link on TCP as between hosts, with CurveZMQ keys on both (the
   default) and without (--insecure); and the same-host default, a private Unix socket (see
   cluster/same_host.py). K = 1 and K = 2 side by side on nodes of their own, every column's
   requests interleaved so all see the same machine (see `hops`); the nodes run
   --no-recalibrate, so that none re-measures its speed (a benchmark of a few tenths of a
   second that a node runs while idle) in the middle of the rounds.
3. Balance by measurement: `tests.models.misleading_costs` (full sorts, then MatMuls, whose
   FLOP estimates mislead) on 2 local nodes with the plan made on estimates, its cuts kept
   (`--no-rebalance`) against the default, which moves them on the nodes' measured compute;
   throughput after the moves, both in turn --repeat times.

Run: `python benchmarks/pipeline.py [--requests 160] [--repeat 3] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil
import zmq
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.feeds import random_feeds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.models import misleading_costs  # noqa: E402

DEMO = ROOT / "assets" / "demo-resnet.onnx"
CORES = os.cpu_count() or 1
SIZES = (("4 KiB", 1024), ("1 MiB", 256 * 1024), ("8 MiB", 2 * 1024 * 1024))  # float32s


def relu_chain(path: Path, width: int, n: int = 2) -> Path:
    """n Relu over a [1, width] float tensor: nearly free to compute, so a hop is what costs."""
    nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"], name=f"relu{i}")
             for i in range(n)]
    graph = helper.make_graph(nodes, "hops",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT,
                                                             [1, width])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=8), path)
    return path


def deployed(master: Master, path: Path, k: int | None) -> Pipeline:
    """The model planned into k stages on the first k nodes (None: the shape the planner
    picks for every node), with the serving defaults."""
    loaded = load_model(path)
    analysis = analyze(loaded)
    if k is None:
        pipeline = Pipeline(master, loaded, analysis)
        pipeline.deploy()
        return pipeline
    pipeline = Pipeline(master, loaded, analysis, plan=make_plan(analysis, k))
    pipeline.deploy([h.node_id for h in master.alive_nodes()][:k])
    return pipeline


# ---------------------------------------------------------------------- plain ONNX Runtime

def _session(threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(DEMO), opts, providers=["CPUExecutionProvider"])


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    specs = analyze(load_model(DEMO)).inputs
    return [random_feeds(specs, i % 8) for i in range(count)]


def plain_rps(requests: int) -> tuple[float, float]:
    """One process, every core: a loop of session.run. Requests/s and CPU s per request."""
    session, feeds = _session(CORES), _feeds(requests)
    for f in feeds[:5]:
        session.run(None, f)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for f in feeds:
        session.run(None, f)
    return requests / (time.perf_counter() - t0), (_cpu_s() - cpu0) / requests


def _replica(count: int, start: mp.Event, done: mp.Queue) -> None:  # type: ignore[type-arg]
    session, feeds = _session(1), _feeds(count)
    for f in feeds[:5]:
        session.run(None, f)
    done.put("ready")
    start.wait()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for f in feeds:
        session.run(None, f)
    done.put((time.perf_counter() - t0, _cpu_s() - cpu0))


def replicas_rps(requests: int) -> tuple[float, float]:
    """One process per core, one thread each, the requests split between them. Requests/s
    and CPU s per request (every replica's)."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    each = requests // CORES
    procs = [ctx.Process(target=_replica, args=(each, start, done)) for _ in range(CORES)]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # every replica has loaded its session and warmed up
            done.get(timeout=120)
        start.set()
        walls, cpus = zip(*(done.get(timeout=300) for _ in procs), strict=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return each * CORES / max(walls), sum(cpus) / (each * CORES)


# ---------------------------------------------------------------------- Periphery

def periphery_run(k: int | None, requests: int, inflight: int, same_host_ipc: bool = True,
                  workers: int | None = None) -> tuple[float, float, str, float, float]:
    """Requests/s of the demo model on k local nodes (None: one per core, the planner's
    shape), the slowest stage's mean compute per replica and worker (a stage computing two
    at once serves one per half its compute), the shape, the CPU seconds per request of this
    process (the master and the loop submitting to it: what the cores the nodes share pay for
    the master), and those of every process (this one and the nodes)."""
    compute: dict[int, list[float]] = defaultdict(list)

    def on_event(e: ev.Event) -> None:
        if isinstance(e, ev.RequestCompleted):
            for s in e.stages:
                compute[s.stage].append(s.compute_s)

    with LocalCluster(k or CORES, workers=workers) as local, \
            local.master(same_host_ipc=same_host_ipc) as master:
        pipeline = deployed(master, DEMO, k)
        assert pipeline.plan is not None
        shape, replicas = pipeline.plan.shape, pipeline.plan.replicas
        feeds = [random_feeds(pipeline.analysis.inputs, i) for i in range(8)]
        # Warm-up, long enough for the default rebalancing to measure and settle (48 requests a
        # look, up to three looks), so what is timed is the pipeline as it keeps serving.
        list(pipeline.run_many((feeds[i % 8] for i in range(200)), inflight=inflight))
        master.bus.subscribe(on_event)
        nodes = [psutil.Process(n.process.pid) for n in local.nodes]
        nodes0 = sum(_times(p) for p in nodes)
        cpu0, t0 = _cpu_s(), time.perf_counter()
        list(pipeline.run_many((feeds[i % 8] for i in range(requests)), inflight=inflight))
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        every = cpu + sum(_times(p) for p in nodes) - nodes0
        pipeline.close()
    slowest = max(statistics.fmean(v) for v in compute.values())
    return (requests / wall, slowest / replicas / (workers or 1), shape, cpu / requests,
            every / requests)


def _times(process: psutil.Process) -> float:
    t = process.cpu_times()
    return float(t.user + t.system)


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far, every thread."""
    t = os.times()
    return t.user + t.system


def throughput(requests: int, inflight: int, repeat: int) -> list[dict]:
    runs: dict[str, list[float]] = defaultdict(list)
    slowest: dict[str, list[float]] = defaultdict(list)
    master_cpu: dict[str, list[float]] = defaultdict(list)
    every_cpu: dict[str, list[float]] = defaultdict(list)
    names = {"plain": f"ONNX Runtime, 1 process x {CORES} threads",
             "replicas": f"ONNX Runtime, {CORES} processes x 1 thread (replicas)",
             "k1": "Periphery K = 1, defaults",
             "k1w": f"Periphery K = 1, --workers {CORES} ({CORES} requests at once, a thread "
                    "each)",
             **{f"k{k}": f"Periphery K = {k}, defaults" for k in (2, 3)},
             "k2tcp": "Periphery K = 2, every link on CurveZMQ TCP (as between hosts)",
             "pick": "Periphery, the planner's shape"}
    for _ in range(repeat):  # in turn, so that every configuration sees the same machine
        for key, measure in (("plain", plain_rps), ("replicas", replicas_rps)):
            rps, cpu = measure(requests)
            runs[key].append(rps)
            every_cpu[key].append(cpu)
        for k, key in ((1, "k1"), (1, "k1w"), (2, "k2"), (2, "k2tcp"), (3, "k3"),
                       (None, "pick")):
            rps, slow, shape, cpu, every = periphery_run(
                k, requests, inflight, same_host_ipc=key != "k2tcp",
                workers=CORES if key == "k1w" else None)
            runs[key].append(rps)
            slowest[key].append(slow)
            master_cpu[key].append(cpu)
            every_cpu[key].append(every)
            if k is None:
                names["pick"] = f"Periphery, the planner's shape ({shape}), defaults"
    base = statistics.median(runs["plain"])
    rows = []
    for key, name in names.items():
        rps = statistics.median(runs[key])
        row = {"run": name, "rps": rps, "vs_plain": rps / base, "runs": runs[key],
               "cpu_s": statistics.median(every_cpu[key])}
        if key in slowest:
            row["slowest_stage_s"] = statistics.median(slowest[key])
            row["efficiency"] = rps * row["slowest_stage_s"]
            row["master_cpu_s"] = statistics.median(master_cpu[key])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- hops

def _echo(port_q: mp.Queue, secret: bytes | None, public: bytes | None) -> None:  # type: ignore[type-arg]
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    if secret is not None:
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.curve_publickey = public
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    while True:
        frame = sock.recv(copy=False)
        if len(frame) == 0:
            break
        sock.send(frame, copy=False)
    sock.close(linger=0)
    context.term()


class BareZmq:
    """A bare ZeroMQ round trip to an echo process, with CurveZMQ or without."""

    def __init__(self, secure: bool) -> None:
        ctx = mp.get_context("spawn")
        server_public, server_secret = zmq.curve_keypair() if secure else (None, None)
        port_q = ctx.Queue()
        self.proc = ctx.Process(target=_echo, args=(port_q, server_secret, server_public))
        self.proc.start()
        port = port_q.get(timeout=30)
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PAIR)
        if secure:
            public, secret = zmq.curve_keypair()
            self.sock.curve_serverkey = server_public
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def round_trip(self, payload: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.sock.send(payload, copy=False)
        self.sock.recv(copy=False)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.send(b"")
        self.proc.join(timeout=10)
        self.sock.close(linger=0)
        self.context.term()


# Every link on TCP as between hosts, with keys and without; the same-host default.
_HOP_LINKS = {"keys": {"secure": True, "same_host_ipc": False},
              "insecure": {"secure": False, "same_host_ipc": False},
              "near": {"secure": True, "same_host_ipc": True}}


def hops(repeat: int) -> list[dict]:
    """Per size: bare ZeroMQ round trip, and the latency one extra pipeline hop adds.

    K = 1 and K = 2 run side by side, each on nodes and a master of its own (a master runs one
    deployment at a time), one request each in turn, in alternating order: measured one after
    the other, a drift of the machine between the two phases moved a hop by 20-40% from run to
    run (and the K = 2 phase woke twice the node processes of the K = 1 phase). A hop is the
    median of the paired differences, K = 2 minus K = 1, of the same rounds.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        masters = {}
        for link, opts in _HOP_LINKS.items():
            for k in (1, 2):
                local = stack.enter_context(
                    LocalCluster(k, secure=opts["secure"], recalibrate=False))
                masters[(link, k)] = stack.enter_context(
                    local.master(same_host_ipc=opts["same_host_ipc"]))
        bare = {"keys": BareZmq(True), "insecure": BareZmq(False)}
        stack.callback(lambda: [b.close() for b in bare.values()])
        for label, width in SIZES:
            path = relu_chain(Path(tmp) / f"hops-{width}.onnx", width)
            payload = np.ones(width, dtype=np.float32)
            feeds = {"x0": np.ones((1, width), dtype=np.float32)}
            pipes = [(key, deployed(m, path, key[1])) for key, m in masters.items()]
            for _ in range(5):
                for _key, pipe in pipes:
                    pipe.submit(feeds).result()
            times: dict[tuple[str, object], list[float]] = defaultdict(list)
            for i in range(repeat):
                for sec, b in bare.items():
                    times[(sec, "bare")].append(b.round_trip(payload))
                for key, pipe in pipes if i % 2 == 0 else pipes[::-1]:
                    t0 = time.perf_counter()
                    pipe.submit(feeds).result()
                    times[key].append(time.perf_counter() - t0)
            for _key, pipe in pipes:
                pipe.close()
            row: dict[str, object] = {"size": label, "bytes": width * 4}
            for link in _HOP_LINKS:
                row[f"hop_{link}_s"] = statistics.median(
                    two - one for one, two in zip(times[(link, 1)], times[(link, 2)], strict=True))
            for sec in bare:
                row[f"bare_{sec}_s"] = bare_s = statistics.median(times[(sec, "bare")])
                row[f"target_{sec}_s"] = 1.2 * bare_s + 50e-6
            rows.append(row)
    return rows


def rebalanced(requests: int, repeat: int) -> dict:
    """Requests/s of the misleading model on 2 nodes: cuts kept against cuts moved."""
    runs: dict[str, list[float]] = defaultdict(list)
    stages: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "misleading.onnx"
        onnx.save_model(misleading_costs(), path)
        loaded = load_model(path)
        analysis = analyze(loaded)
        plan = make_plan(analysis, 2)
        feeds = [random_feeds(analysis.inputs, i) for i in range(8)]
        for _ in range(repeat):
            for name, moving in (("kept", False), ("moved", True)):
                compute: dict[int, list[float]] = defaultdict(list)
                moves: list[ev.Rebalanced] = []

                def on_event(e: ev.Event, compute=compute, moves=moves) -> None:
                    if isinstance(e, ev.Rebalanced):
                        moves.append(e)
                        compute.clear()
                    elif isinstance(e, ev.RequestCompleted):
                        for t in e.stages:
                            compute[t.stage].append(t.compute_s)

                with LocalCluster(2) as local, local.master() as master:
                    pipeline = Pipeline(master, loaded, analysis, plan=plan, rebalance=moving)
                    pipeline.deploy([h.node_id for h in master.alive_nodes()][:2])
                    master.bus.subscribe(on_event)
                    # Long enough to measure and move (48 requests a look, up to 3 looks).
                    list(pipeline.run_many((feeds[i % 8] for i in range(200)), inflight=8))
                    t0 = time.perf_counter()
                    list(pipeline.run_many((feeds[i % 8] for i in range(requests)), inflight=8))
                    runs[name].append(requests / (time.perf_counter() - t0))
                    pipeline.close()
                stages[name] = [statistics.median(compute[s]) for s in sorted(compute)]
                stages[f"{name}_nodes"] = [len(s.nodes) for s in (pipeline.plan or plan).stages]
    return {"kept_rps": statistics.median(runs["kept"]),
            "moved_rps": statistics.median(runs["moved"]), "runs": runs, **stages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per configuration")
    parser.add_argument("--hop-repeat", type=int, default=60, help="requests per hop figure")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=130)
    tput = throughput(args.requests, args.inflight, args.repeat)
    t = Table(title=f"demo-resnet throughput ({CORES} cores, {args.inflight} in flight, medians "
                    f"of {args.repeat} runs in turn)", title_justify="left")
    for col in ("run", "requests/s", "vs ONNX Runtime", "slowest stage, mean", "efficiency",
                "master CPU / request", "CPU / request, every process"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in tput:
        t.add_row(r["run"], f"{r['rps']:.1f}", f"{r['vs_plain']:.2f}x",
                  f"{r['slowest_stage_s'] * 1e3:.2f} ms" if "slowest_stage_s" in r else "-",
                  f"{r['efficiency']:.2f}" if "efficiency" in r else "-",
                  f"{r['master_cpu_s'] * 1e3:.2f} ms" if "master_cpu_s" in r else "-",
                  f"{r['cpu_s'] * 1e3:.2f} ms")
    console.print(t)
    hop = hops(args.hop_repeat)

    def us(v: object) -> str:
        return f"{float(v) * 1e6:,.0f} µs"  # type: ignore[arg-type]

    t = Table(title="what one extra hop adds, one request at a time, against a bare ZeroMQ round "
                    "trip of the same bytes (target: 1.2x bare + 50 µs)", title_justify="left")
    for col in ("activation", "bare RTT, keys", "hop, keys", "bare RTT, --insecure",
                "hop, --insecure", "hop / target, --insecure", "hop, same host"):
        t.add_column(col, justify="right")
    for r in hop:
        t.add_row(str(r["size"]), us(r["bare_keys_s"]), us(r["hop_keys_s"]),
                  us(r["bare_insecure_s"]), us(r["hop_insecure_s"]),
                  f"{float(r['hop_insecure_s']) / float(r['target_insecure_s']):.2f}",  # type: ignore[arg-type]
                  us(r["hop_near_s"]))
    console.print(t)
    bal = rebalanced(args.requests, args.repeat)
    t = Table(title="balance by measurement: misleading_costs on 2 nodes, plan on estimates "
                    f"(medians of {args.repeat} runs in turn)", title_justify="left")
    for col in ("cuts", "nodes per stage", "stage compute", "requests/s"):
        t.add_column(col, justify="left" if col == "cuts" else "right")
    for name, label in (("kept", "kept (--no-rebalance)"), ("moved", "moved on measurement")):
        t.add_row(label, "/".join(map(str, bal[f"{name}_nodes"])),
                  " / ".join(f"{c * 1e3:.1f} ms" for c in bal[name]), f"{bal[f'{name}_rps']:.1f}")
    console.print(t)
    console.print(f"moved / kept: {bal['moved_rps'] / bal['kept_rps']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"throughput": tput, "hops": hop, "rebalance": bal},
                                        indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
