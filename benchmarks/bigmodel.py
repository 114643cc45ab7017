"""A model larger than protobuf's 2 GiB limit through analyse, plan, shard and verify.

Builds a random-weight Llama-architecture decoder of about 3 GiB in float32 with its weights in
one external data file (RMSNorm, rotary attention with a causal mask, SiLU-gated MLP, untied
embedding and head), written straight to disk weight by weight so the builder itself stays
small. Then runs the user's steps as the CLI does, each in its own process:

    periphery analyze MODEL --json
    periphery plan MODEL --shards 4 -o plan.json
    periphery shard MODEL --plan plan.json -o shards/
    periphery verify MODEL shards/ --exact

and prints each step's wall time and peak resident memory (sampled every 20 ms over the process
and its children) against the model's size. Target: every step at most 1.5x the model's size.
Then it deploys, as `periphery run --local` does, the whole model as one stage (more than one
protobuf can hold: the node builds it through a file) and the plan on 4 local nodes, runs one
request through each, and prints the master process's peak memory, the longest its other
threads waited for the interpreter lock, and each node's peak against its stage's weights and
against plain ONNX Runtime loading and running the stage's file from `shard` in a fresh process.
Last, the model at 5 layers saved as one file (no data file, as most exports under 2 GiB are),
deployed K = 2: the master's peak loading it, deploying it, and its memory after the deploy.

Run: `python benchmarks/bigmodel.py [--layers 13] [--keep DIR] [--json out.json]`. It needs
about 4x the model's size in free disk (the model and its shards) and takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

HIDDEN, INTERMEDIATE, VOCAB, HEADS, SEQ = 2048, 5632, 32000, 16, 16
HEAD = HIDDEN // HEADS
GIB = 1 << 30


class _Weights:
    """Writes initializers to one external data file as they are made, keeping none in memory."""

    def __init__(self, folder: Path, location: str, seed: int = 0) -> None:
        self.location = location
        self.file = (folder / location).open("wb")
        self.rng = np.random.default_rng(seed)
        self.tensors: list[TensorProto] = []
        self.bytes = 0

    def random(self, name: str, shape: tuple[int, ...], scale: float = 0.02) -> str:
        return self.array(name, self.rng.standard_normal(shape, dtype=np.float32) * scale)

    def array(self, name: str, value: np.ndarray) -> str:
        if value.nbytes < 1024:  # small ones inline, as exporters do (shape inference reads them)
            self.tensors.append(numpy_helper.from_array(value, name))
            return name
        offset = self.file.tell()
        data = np.ascontiguousarray(value).tobytes()
        self.file.write(data)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                             dims=value.shape, data_location=TensorProto.EXTERNAL)
        for key, val in (("location", self.location), ("offset", str(offset)),
                         ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, val
        self.tensors.append(tensor)
        self.bytes += len(data)
        return name

    def close(self) -> None:
        self.file.close()


def build(path: Path, layers: int) -> int:
    """Write the model to `path` (weights beside it); returns the weights' bytes."""
    w = _Weights(path.parent, path.name + ".data")
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(name: str, value: np.ndarray) -> str:
        return w.array(name, value)

    eps = const("eps", np.array(1e-5, dtype=np.float32))
    scale = const("scale", np.array(1.0 / np.sqrt(HEAD), dtype=np.float32))
    heads_shape = const("heads_shape", np.array([1, SEQ, HEADS, HEAD], dtype=np.int64))
    flat_shape = const("flat_shape", np.array([1, SEQ, HIDDEN], dtype=np.int64))
    mask = np.triu(np.full((SEQ, SEQ), -1e9, dtype=np.float32), 1)[None, None]
    causal = const("causal", mask)
    inv = 1.0 / (10000 ** (np.arange(0, HEAD, 2, dtype=np.float32) / HEAD))
    angles = np.outer(np.arange(SEQ, dtype=np.float32), inv)
    cos = const("cos", np.concatenate([np.cos(angles)] * 2, -1)[None, None])
    sin = const("sin", np.concatenate([np.sin(angles)] * 2, -1)[None, None])
    half = const("half", np.array([HEAD // 2, HEAD // 2], dtype=np.int64))

    def rms(x: str, prefix: str) -> str:
        gamma = w.array(f"{prefix}.weight", np.ones(HIDDEN, dtype=np.float32))
        sq = node("Mul", [x, x], f"{prefix}/sq")
        mean = node("ReduceMean", [sq], f"{prefix}/mean", axes=[-1], keepdims=1)
        root = node("Sqrt", [node("Add", [mean, eps], f"{prefix}/eps")], f"{prefix}/sqrt")
        return node("Mul", [node("Div", [x, root], f"{prefix}/div"), gamma], f"{prefix}/out")

    def rotary(x: str, prefix: str) -> str:
        nodes.append(helper.make_node("Split", [x, half], [f"{prefix}/x1", f"{prefix}/x2"],
                                      name=f"{prefix}/split", axis=-1))
        rotated = node("Concat", [node("Neg", [f"{prefix}/x2"], f"{prefix}/neg"), f"{prefix}/x1"],
                       f"{prefix}/rot", axis=-1)
        return node("Add", [node("Mul", [x, cos], f"{prefix}/cos"),
                            node("Mul", [rotated, sin], f"{prefix}/sin")], f"{prefix}/out")

    def heads(x: str, prefix: str) -> str:
        return node("Transpose", [node("Reshape", [x, heads_shape], f"{prefix}/split")],
                    f"{prefix}/heads", perm=[0, 2, 1, 3])

    x = node("Gather", [w.random("embed.weight", (VOCAB, HIDDEN)), "input_ids"], "embed")
    for i in range(layers):
        p = f"/layers.{i}"
        h = rms(x, f"{p}/attn_norm")
        q = rotary(heads(node("MatMul", [h, w.random(f"{p}.q", (HIDDEN, HIDDEN))], f"{p}/q"),
                         f"{p}/q"), f"{p}/q_rot")
        k = rotary(heads(node("MatMul", [h, w.random(f"{p}.k", (HIDDEN, HIDDEN))], f"{p}/k"),
                         f"{p}/k"), f"{p}/k_rot")
        v = heads(node("MatMul", [h, w.random(f"{p}.v", (HIDDEN, HIDDEN))], f"{p}/v"), f"{p}/v")
        scores = node("MatMul", [q, node("Transpose", [k], f"{p}/kT", perm=[0, 1, 3, 2])],
                      f"{p}/scores")
        scores = node("Add", [node("Mul", [scores, scale], f"{p}/scaled"), causal],
                      f"{p}/masked")
        attn = node("MatMul", [node("Softmax", [scores], f"{p}/softmax", axis=-1), v],
                    f"{p}/attn")
        merged = node("Reshape", [node("Transpose", [attn], f"{p}/merge", perm=[0, 2, 1, 3]),
                                  flat_shape], f"{p}/flat")
        x = node("Add", [x, node("MatMul", [merged, w.random(f"{p}.o", (HIDDEN, HIDDEN))],
                                 f"{p}/o")], f"{p}/attn_res")
        h = rms(x, f"{p}/mlp_norm")
        gate = node("MatMul", [h, w.random(f"{p}.gate", (HIDDEN, INTERMEDIATE))], f"{p}/gate")
        up = node("MatMul", [h, w.random(f"{p}.up", (HIDDEN, INTERMEDIATE))], f"{p}/up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        down = node("MatMul", [node("Mul", [silu, up], f"{p}/gated"),
                               w.random(f"{p}.down", (INTERMEDIATE, HIDDEN))], f"{p}/down")
        x = node("Add", [x, down], f"{p}/mlp_res")
    logits = node("MatMul", [rms(x, "/norm"), w.random("lm_head", (HIDDEN, VOCAB))], "logits")
    w.close()
    graph = helper.make_graph(
        nodes, "big-llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, SEQ, VOCAB])],
        w.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return w.bytes


def measured(args: list[str], cwd: Path) -> dict:
    """Run a CLI step; its wall time and the peak RSS of it and its children."""
    proc = subprocess.Popen([sys.executable, "-m", "periphery_core.cli.main", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                family = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in family))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"periphery {' '.join(args)} failed ({proc.returncode}): "
                         f"{err.strip().splitlines()[-1] if err.strip() else out[-500:]}")
    return {"step": "periphery " + " ".join(args), "wall_s": wall, "peak_rss": peak}


def probe_deploy(work: Path, plan_name: str) -> None:
    """(In a process of its own.) Deploy the planned model on local nodes as `periphery run
    --local` does, through the serving pipeline, and print as JSON the deploy's wall time, this
    master process's peak RSS (the nodes are processes of their own) and the longest time a
    thread of it that ticks every 5 ms waited: what the app's screen and the master's other
    threads wait while the deploy holds Python's interpreter lock."""
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.pipeline import Pipeline
    from periphery_core.model import load_model
    from periphery_core.model.analysis import analyze
    from periphery_core.model.loading import approx_nbytes
    from periphery_core.partition.plan import load_plan
    from periphery_core.runtime.feeds import random_feeds

    loaded = load_model(work / "model.onnx")
    plan = load_plan(work / plan_name)
    analysis = analyze(loaded, plan.input_shapes)
    loaded_hwm = _hwm(Path("/proc/self/status"))  # (loading the model, before the deploy)
    waits: list[float] = []
    rss: list[int] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.wait(0.005):
            now = time.perf_counter()
            waits.append(now - last - 0.005)
            last = now
            if len(waits) % 4 == 0:
                rss.append(psutil.Process().memory_info().rss)

    with LocalCluster(plan.nodes_needed) as local, local.master() as master:
        ticker = threading.Thread(target=tick, daemon=True)
        t0 = time.perf_counter()
        ticker.start()
        pipeline = Pipeline(master, loaded, analysis, plan=plan)
        pipeline.deploy([a.node_id for a in local.addresses])
        wall = time.perf_counter() - t0
        done.set()
        ticker.join()
        after = psutil.Process().memory_info().rss
        outputs = pipeline.submit(random_feeds(analysis.inputs)).result(timeout=300)  # it runs
        assert all(np.isfinite(v).all() for v in outputs.values())
        nodes = [_hwm(Path(f"/proc/{n.process.pid}/status")) for n in local.nodes]
        stages = [sum(approx_nbytes(t) for t in loaded.proto.graph.initializer
                      if t.name in names) for names in _stage_weights(loaded, plan)]
        pipeline.close()
    k = plan.nodes_needed
    print(json.dumps({"step": f"deploy on {k} local node{'s' * (k > 1)} (Pipeline.deploy, as "
                              "run --local)",
                      "wall_s": wall, "peak_rss": _hwm(Path("/proc/self/status")),
                      "loaded_peak_rss": loaded_hwm, "deploy_peak_rss": max(rss, default=after),
                      "after_rss": after,
                      "longest_wait_s": max(waits),
                      "nodes": [{"peak_rss": n, "stage_weights": w}
                                for n, w in zip(nodes, stages, strict=True)]}))


# A stage's file loaded and run once by plain ONNX Runtime in a fresh process: its peak memory.
_PLAIN = """
import resource, sys
import numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
s.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], types[i.type])
             for i in s.get_inputs()})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def plain_ort_peak(path: Path) -> int:
    """Peak resident memory of plain ONNX Runtime loading `path` and running it once."""
    out = subprocess.run([sys.executable, "-c", _PLAIN, str(path)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def single_file(folder: Path, layers: int) -> tuple[dict, int]:
    """The model at `layers` layers saved as one file (under 2 GiB, as most exports are),
    planned K = 2 and deployed by `probe_deploy`: its figures and the model's weights."""
    folder.mkdir(parents=True, exist_ok=True)
    size = build(folder / "built.onnx", layers)
    onnx.save_model(onnx.load(str(folder / "built.onnx")), folder / "model.onnx")
    for built in folder.glob("built.onnx*"):
        built.unlink()
    subprocess.run([sys.executable, "-m", "periphery_core.cli.main", "plan", "model.onnx",
                    "--shards", "2", "-o", "plan.json"], cwd=folder, check=True,
                   capture_output=True)
    probe = subprocess.run([sys.executable, __file__, "--probe-deploy", str(folder),
                            "--probe-plan", "plan.json"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"the deploy failed: {probe.stderr.strip()[-500:]}")
    return json.loads(probe.stdout.strip().splitlines()[-1]), size


def _hwm(status: Path) -> int:
    """A process's peak resident memory, from its /proc status."""
    lines = status.read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM"))


def _stage_weights(loaded, plan) -> list[set[str]]:  # type: ignore[no-untyped-def]
    """The names of the weights each stage's nodes read."""
    from periphery_core.model.graph import node_keys

    inits = {t.name for t in loaded.proto.graph.initializer}
    by_key = dict(zip(node_keys(loaded.proto.graph), loaded.proto.graph.node, strict=True))
    return [{n for k in stage.nodes if k in by_key for n in by_key[k].input if n in inits}
            for stage in plan.stages]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=13, help="13 layers: about 3.1 GiB")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder, kept")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--single-layers", type=int, default=5,
                        help="the single-file model's layers (5: about 1.45 GiB)")
    parser.add_argument("--probe-deploy", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-plan", default="plan.json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_deploy is not None:
        probe_deploy(args.probe_deploy, args.probe_plan)
        return 0
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="periphery-big-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "model.onnx"
        t0 = time.perf_counter()
        size = build(model, args.layers)
        console.print(f"built {model} ({size / GIB:.2f} GiB of weights, {args.layers} layers) "
                      f"in {time.perf_counter() - t0:.0f} s")
        steps = [["analyze", "model.onnx", "--json"],
                 ["plan", "model.onnx", "--shards", "4", "-o", "plan.json"],
                 ["shard", "model.onnx", "--plan", "plan.json", "-o", "shards"],
                 ["verify", "model.onnx", "shards", "--exact"]]
        rows = [measured(step, work) for step in steps]
        plain = [plain_ort_peak(work / "shards" / f"stage-{i}.onnx") for i in range(4)]
        subprocess.run([sys.executable, "-m", "periphery_core.cli.main", "plan", "model.onnx",
                        "--shards", "1", "-o", "plan1.json"], cwd=work, check=True,
                       capture_output=True)
        deploys = []
        for plan_name in ("plan1.json", "plan.json"):  # the whole model as one stage; K = 4
            probe = subprocess.run([sys.executable, __file__, "--probe-deploy", str(work),
                                    "--probe-plan", plan_name], capture_output=True, text=True)
            if probe.returncode != 0:
                raise SystemExit(f"the deploy failed: {probe.stderr.strip()[-500:]}")
            deploys.append(json.loads(probe.stdout.strip().splitlines()[-1]))
        rows += deploys
        single, single_size = single_file(work / "single", args.single_layers)
    t = Table(title=f"a {size / GIB:.2f} GiB model (float32 Llama, {args.layers} layers), K = 4, "
                    "each step a process of its own", title_justify="left")
    for col in ("step", "wall", "peak RSS", "x model size"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for r in rows:
        r["ratio"] = r["peak_rss"] / size
        if "nodes" in r:
            r["step"] += f"; node peak {max(n['peak_rss'] for n in r['nodes']) / GIB:.2f} GiB"
        t.add_row(r["step"], f"{r['wall_s']:.1f} s", f"{r['peak_rss'] / GIB:.2f} GiB",
                  f"{r['ratio']:.2f}x")
    console.print(t)
    for i, node in enumerate(rows[-1]["nodes"]):
        node["plain_ort_peak_rss"] = plain[i]
        console.print(f"node of stage {i}: peak {node['peak_rss'] / GIB:.2f} GiB for "
                      f"{node['stage_weights'] / GIB:.2f} GiB of weights "
                      f"({node['peak_rss'] / node['stage_weights']:.2f}x); plain ONNX Runtime "
                      f"loading and running the stage's file: {plain[i] / GIB:.2f} GiB")
    console.print(f"a single-file model ({single_size / GIB:.2f} GiB of weights, no data file), "
                  f"K = 2, the master: loading {single['loaded_peak_rss'] / single_size:.2f}x "
                  f"its weights, deploying {single['deploy_peak_rss'] / single_size:.2f}x, "
                  f"after the deploy {single['after_rss'] / single_size:.2f}x")
    worst = max(r["ratio"] for r in rows[:-2])
    console.print(f"worst CLI step: {worst:.2f}x the model's size (target 1.5x); the deploy's "
                  f"master: {rows[-1]['ratio']:.2f}x, its other threads waited at most "
                  f"{rows[-1]['longest_wait_s']:.2f} s at a time")
    if args.json:
        args.json.write_text(json.dumps({"model_bytes": size, "steps": rows,
                                         "single_file": {"model_bytes": single_size,
                                                         **single}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
