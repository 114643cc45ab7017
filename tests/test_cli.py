"""`periphery` as a user runs it: real subprocesses, real models, exit codes and stderr.

Exit codes: 0 success, 1 verify found a difference, 2 bad input with exactly one line on stderr
and never a traceback. Each subprocess costs about a second of imports, so the shared steps
(plan, shard) run once per module in fixtures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests import models
from tests.conftest import MODELS, ROOT, require_shared

MNIST = MODELS / "mnist-8.onnx"
SQUEEZENET = MODELS / "light_squeezenet_randw.onnx"
STORIES = MODELS / "stories260K.onnx"

DEVICES_TOML = """\
[[device]]
name = "slow-pi"
speed = 1
memory = "8GiB"
bandwidth = "1Gbit/s"

[[device]]
name = "fast-box"
speed = 4.0
memory = "16GiB"
bandwidth = "10Gbit/s"
"""


def cli(*args: object, columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PERIPHERY_DEBUG"}
    env["COLUMNS"] = str(columns)  # (wide: keep rich's tables from eliding cells)
    result = subprocess.run(
        [sys.executable, "-m", "periphery_core.cli.main", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=180,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def ok(*args: object) -> subprocess.CompletedProcess[str]:
    result = cli(*args)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result


def ok_json(*args: object) -> dict:
    return json.loads(ok(*args, "--json").stdout)


def assert_bad_input(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    """Exit 2, no traceback, exactly one non-empty line on stderr that matches `pattern`."""
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2, (
        f"exit {result.returncode}, expected 2; stderr: {result.stderr!r}")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"not one line: {result.stderr!r}"
    assert re.search(pattern, lines[0], re.IGNORECASE), f"{pattern!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_shared()
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def squeezenet(work: Path) -> tuple[Path, dict]:
    """light_squeezenet_randw planned into 3 stages (plan --json) and sharded from the plan."""
    plan = work / "squeezenet-plan.json"
    summary = ok_json("plan", SQUEEZENET, "--shards", 3, "-o", plan)
    out = work / "squeezenet-shards"
    ok("shard", SQUEEZENET, "--plan", plan, "-o", out)
    return out, summary


@pytest.fixture(scope="module")
def mnist(work: Path) -> tuple[Path, Path]:
    """mnist-8 planned into 3 stages as a TOML plan, and sharded from it."""
    plan = work / "mnist-plan.toml"
    ok("plan", MNIST, "--shards", 3, "-o", plan)
    assert plan.read_text().startswith('format = "periphery.plan"')
    out = work / "mnist-shards"
    ok("shard", MNIST, "--plan", plan, "-o", out)
    return plan, out


# --------------------------------------------------------------------------- happy paths


def test_analyze_json() -> None:
    require_shared()
    data = ok_json("analyze", MNIST)
    assert data["node_count"] == 12 and len(data["nodes"]) == 12
    assert data["inputs"] == [{"name": "Input3", "dtype": "float32", "shape": [1, 1, 28, 28]}]
    assert data["outputs"] == [{"name": "Plus214_Output_0", "dtype": "float32",
                                "shape": [1, 10]}]
    assert data["total_flops"] > 0
    assert data["op_histogram"]["Conv"] == 2
    assert data["profiled"] is False and data["measured_s"] is None
    # --top lists the costliest nodes in JSON too (it listed every node whatever it said)
    top = ok_json("analyze", MNIST, "--top", "3")["nodes"]
    assert [n["key"] for n in top] == [n["key"] for n in data["nodes"][:3]]
    assert top[0]["flops"] == max(n["flops"] for n in data["nodes"])


def test_analyze_profile_json() -> None:
    require_shared()
    data = ok_json("analyze", MNIST, "--profile")
    assert data["profiled"] is True and data["measured_s"] > 0
    measured = [n["measured_s"] for n in data["nodes"]]
    assert len(measured) == 12 and all(m is not None and m >= 0 for m in measured)
    assert sum(measured) > 0


def test_plan_json_summary(squeezenet: tuple[Path, dict]) -> None:
    _, summary = squeezenet
    assert {"stages", "bottleneck_s", "balance_ratio", "devices", "model_sha256"} <= set(summary)
    stages = summary["stages"]
    assert [s["index"] for s in stages] == [0, 1, 2]
    assert sum(len(s["nodes"]) for s in stages) == 66
    assert summary["bottleneck_s"] == max(max(s["compute_s"], s["transfer_s"]) for s in stages)
    assert summary["balance_ratio"] >= 1.0


def test_plan_shard_verify_exact(squeezenet: tuple[Path, dict]) -> None:
    out, _ = squeezenet
    assert sorted(p.name for p in out.iterdir()) == [
        "plan.json", "stage-0.onnx", "stage-1.onnx", "stage-2.onnx"]
    report = ok_json("verify", SQUEEZENET, out, "--exact")
    assert report["passed"] and report["exact"]
    assert report["outputs"] and all(o["bit_identical"] for o in report["outputs"])


def test_transformer_with_input_shape(work: Path) -> None:
    plan = work / "stories-plan.json"
    ok("plan", STORIES, "--shards", 4, "--input-shape", "tokens=1x8", "-o", plan)
    assert json.loads(plan.read_text())["input_shapes"] == {"tokens": [1, 8]}
    out = work / "stories-shards"
    ok("shard", STORIES, "--plan", plan, "-o", out)
    report = ok_json("verify", STORIES, out, "--exact")
    assert report["passed"]
    # verify ran with the plan's shapes, not the all-ones default.
    assert [o["shape"] for o in report["outputs"]] == [[1, 8, 512]]


def test_toml_plan_round_trips_through_shard(mnist: tuple[Path, Path]) -> None:
    _, out = mnist
    result = ok("verify", MNIST, out, "--exact")
    assert "PASS" in result.stdout


def test_verify_with_inputs_npz(mnist: tuple[Path, Path], tmp_path: Path) -> None:
    feeds = tmp_path / "feeds.npz"
    rng = np.random.default_rng(7)
    np.savez(feeds, Input3=rng.random((1, 1, 28, 28), dtype=np.float32))
    report = ok_json("verify", MNIST, mnist[1], "--inputs", feeds, "--exact")
    assert report["passed"] and report["outputs"][0]["shape"] == [1, 10]


def test_devices_file_shapes_the_plan(work: Path) -> None:
    devices = work / "devices.toml"
    devices.write_text(DEVICES_TOML)
    uniform = ok_json("plan", SQUEEZENET, "--shards", 2, "-o", work / "uniform.json")
    hetero = ok_json("plan", SQUEEZENET, "--shards", 2, "--devices", devices,
                     "-o", work / "hetero.json")
    assert [d["name"] for d in hetero["devices"]] == ["slow-pi", "fast-box"]
    assert [s["device"] for s in hetero["stages"]] == ["slow-pi", "fast-box"]
    assert hetero["devices"][0]["memory_bytes"] == 8 * 2**30
    assert hetero["devices"][0]["bandwidth"] == 125e6
    assert hetero["devices"][1]["bandwidth"] == 1.25e9
    slow, fast = (s["flops"] for s in hetero["stages"])
    assert fast > 2 * slow, "the 4x device should take most of the compute"
    assert fast > uniform["stages"][1]["flops"], "the fast device got no more than its fair share"
    assert hetero["bottleneck_s"] < uniform["bottleneck_s"]


def test_a_plan_says_what_its_times_are(work: Path) -> None:
    """Without devices a plan's times are for reference machines, far slower than a user's:
    the plan says so and how to get figures of their own; with a devices file or --profile it
    says what its times are instead."""
    devices = work / "devices-said.toml"
    devices.write_text(DEVICES_TOML)
    said = {}
    for name, extra in (("reference", ()), ("devices", ("--devices", devices)),
                        ("profile", ("--profile",))):
        said[name] = ok("plan", SQUEEZENET, "--shards", 2, *extra,
                        "-o", work / f"said-{name}.json").stdout
    said = {name: " ".join(text.split()) for name, text in said.items()}
    # estimates scaled to the model's own timed run, unless each node was measured
    assert ("FLOP estimates scaled to a timed run of the whole model on this host, on "
            "reference machines of 10 GFLOP/s") in said["reference"], said["reference"]
    assert "--devices" in said["reference"] and "--profile" in said["reference"]
    assert "reference machines" not in said["devices"] + said["profile"]
    assert "timed run of the whole model on this host, at each device's speed" in said["devices"]
    assert "measured by running the model on this host" in said["profile"]
    basis = {name: json.loads((work / f"said-{name}.json").read_text())["cost_basis"]
             for name in said}
    assert basis == {"reference": "calibrated", "devices": "calibrated", "profile": "profile"}


def test_a_device_computing_several_requests_at_once_holds_each_ones_activations(
        work: Path) -> None:
    # The second stage of the uniform split holds about 4 MB of weights and 1.4 MB of
    # activations: within 8 MiB one request at a time, not four (--workers 4).
    base = '[[device]]\nname = "a"\n\n[[device]]\nname = "b"\nmemory = "8MiB"\n'
    plans = {}
    for workers in (1, 4):
        devices = work / f"devices-{workers}.toml"
        devices.write_text(base + f"workers = {workers}\n")
        plans[workers] = ok_json("plan", SQUEEZENET, "--shards", 2, "--devices", devices,
                                 "-o", work / f"plan-{workers}.json")
    one, four = plans[1]["stages"][1], plans[4]["stages"][1]
    assert plans[4]["devices"][1]["workers"] == 4 and four["workers"] == 4
    assert one["param_bytes"] + 4 * one["peak_activation_bytes"] > 8 * 2**20
    assert len(four["nodes"]) < len(one["nodes"])
    assert four["param_bytes"] + 4 * four["peak_activation_bytes"] <= 8 * 2**20
    table = ok("plan", SQUEEZENET, "--shards", 2, "--devices", work / "devices-4.toml",
               "-o", work / "plan-4.json").stdout
    assert "b (4 at once)" in " ".join(table.split())


def test_quantize_with_data_reports_against_fp32(tmp_path: Path) -> None:
    """`quantize --data` prints the result's report on that data, as `evaluate` does (it was
    taken only by --tolerance, and otherwise dropped without a word): MNIST's labels give
    top-1 accuracy, which static INT8 holds within a point."""
    require_shared()
    images = MODELS.parent / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz"
    out = tmp_path / "q.onnx"
    summary = ok_json("quantize", MNIST, "--method", "static", "--calib",
                      f"mnist:{images}?range=0:100", "--data", f"mnist:{images}?range=100:600",
                      "-o", out)
    report = summary["report"]
    assert report["samples"] == 500 and report["task_metric"]["name"] == "top-1 accuracy %"
    fp32, quantized = report["task_metric"]["fp32"], report["task_metric"]["quantized"]
    assert 95 < fp32 <= 100 and abs(quantized - fp32) <= 1.0, report["task_metric"]
    assert report["quant_bytes"] == out.stat().st_size < report["fp32_bytes"]
    # the most sensitive nodes, ranked by the noise each adds, which is what is shown
    added = [n["local_sqnr_db"] for n in report["sensitive_nodes"]]
    assert added and added == sorted(added), report["sensitive_nodes"]
    text = " ".join(ok("quantize", MNIST, "--method", "dynamic", "--data",
                       f"mnist:{images}?range=0:50", "-o", tmp_path / "d[1].onnx").stdout.split())
    assert "quantized vs fp32 on 50 samples" in text and "top-1 accuracy %: fp32" in text, text
    assert "wrote " + str(tmp_path / "d[1].onnx") in text, text  # the name, not Rich markup
    assert "most sensitive, by the noise each adds (SQNR): " in text, text
    # mnist-8 fixes its batch at 1: a larger --batch-size is run at 1, and said so
    said = ok("evaluate", MNIST, out, "--data", f"mnist:{images}?range=0:20", "--batch-size",
              "7", "--latency-runs", "2").stderr
    assert "note: --batch-size 7, but the model takes 1 sample per run: ran that" in said, said


@pytest.mark.parametrize("command", ["", "analyze", "plan", "shard", "verify"])
def test_help(command: str) -> None:
    result = ok(*([command] if command else []), "--help")
    assert "Usage:" in result.stdout
    if command:
        assert f"periphery {command}" in result.stdout
        assert "--help" in result.stdout
    else:
        for name in ("analyze", "plan", "shard", "verify"):
            assert name in result.stdout


# ------------------------------------------------------------------- verify finds differences


def _corrupt_weights(shard_dir: Path) -> str:
    """Change every float weight of the shard holding the most weight bytes; return its name."""
    def weight_bytes(path: Path) -> int:
        return sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer)

    target = max(shard_dir.glob("stage-*.onnx"), key=weight_bytes)
    shard = onnx.load(str(target))
    changed = 0
    for init in shard.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            values = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(values * 2 + 0.5, init.name))
            changed += 1
    assert changed
    onnx.save(shard, str(target))
    return target.name


def test_verify_fails_when_a_shard_differs(squeezenet: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "tampered"
    shutil.copytree(squeezenet[0], out)
    _corrupt_weights(out)
    exact = cli("verify", SQUEEZENET, out, "--exact")
    assert exact.returncode == 1, exact.stderr
    assert "FAIL" in exact.stdout
    (row,) = [line for line in exact.stdout.splitlines() if "1x1000" in line]
    assert row.rstrip(" │|").split()[-1] == "no", row
    tolerant = cli("verify", SQUEEZENET, out, "--json")
    assert tolerant.returncode == 1, tolerant.stderr
    report = json.loads(tolerant.stdout)
    assert not report["passed"] and not report["exact"]
    assert not any(o["within_tolerance"] or o["bit_identical"] for o in report["outputs"])


def test_reshard_into_same_folder_with_fewer_stages(
    mnist: tuple[Path, Path], tmp_path: Path
) -> None:
    # Sharding K=3 then K=2 into one folder must not leave stage-2.onnx for verify to pick up.
    out = tmp_path / "reused"
    shutil.copytree(mnist[1], out)
    ok("shard", MNIST, "--shards", 2, "-o", out)
    ok("verify", MNIST, out, "--exact")


def _nonzero() -> onnx.ModelProto:
    """y = Cast(NonZero(x + W)): how many entries are nonzero only a run of the model tells, so
    its analysis runs it, and that needs W's 8 KiB (a weight `shard` otherwise leaves on disk)."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 2048, dtype=np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "W"], ["s"], name="add"),
         onnx.helper.make_node("NonZero", ["s"], ["nz"], name="nonzero"),
         onnx.helper.make_node("Cast", ["nz"], ["y"], name="cast", to=onnx.TensorProto.FLOAT)],
        "nonzero", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2048])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "n"])], [w])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("model", "how"), [("mlp", "plan"), ("mlp", "shards"),
                                            ("nonzero", "plan")])
def test_shard_model_with_external_data(tmp_path: Path, model: str, how: str) -> None:
    # `shard` leaves the model's big weights on disk and copies each shard's from there.
    proto = models.mlp(width=64) if model == "mlp" else _nonzero()
    (tmp_path / "model").mkdir()
    path = models.save_with_external_data(proto, tmp_path / "model" / "model.onnx")
    out = tmp_path / "shards"
    if how == "plan":
        ok("plan", path, "--shards", 2, "-o", tmp_path / "plan.json")
        ok("shard", path, "--plan", tmp_path / "plan.json", "-o", out)
    else:
        ok("shard", path, "--shards", 2, "-o", out)
    # Shards this small hold their weights inline: nothing points back at the model's w.data.
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "stage-0.onnx", "stage-1.onnx"]
    for stage in ("stage-0.onnx", "stage-1.onnx"):
        onnx.checker.check_model(str(out / stage), full_check=True)
    ok("verify", path, out, "--exact")


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def files(work: Path, mnist: tuple[Path, Path]) -> dict[str, Path]:
    bad = work / "bad"
    bad.mkdir()
    paths = {"mnist": MNIST, "squeezenet": SQUEEZENET, "mnist_plan": mnist[0],
             "mnist_shards": mnist[1], "missing": bad / "missing.onnx"}
    paths["text_onnx"] = bad / "notes.onnx"
    paths["text_onnx"].write_text("these are my notes, not a model\n")
    data = MNIST.read_bytes()
    paths["truncated"] = bad / "truncated.onnx"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    ext_dir = bad / "external"
    ext_dir.mkdir()
    paths["no_external"] = models.save_with_external_data(models.mlp(), ext_dir / "mlp.onnx")
    (ext_dir / "w.data").unlink()
    copy = onnx.load(str(MNIST))
    copy.doc_string = "a retrained copy"  # same graph and inputs, another file
    paths["mnist_copy"] = bad / "mnist-copy.onnx"
    onnx.save(copy, str(paths["mnist_copy"]))
    paths["wrong_shape"] = bad / "wrong-shape.npz"  # MNIST is 1x1x28x28
    np.savez(paths["wrong_shape"], Input3=np.zeros((1, 1, 16, 16), np.float32))
    paths["not_json"] = bad / "plan.json"
    paths["not_json"].write_text("stages: [1, 2]\n")
    paths["garbage_devices"] = bad / "garbage.toml"
    paths["garbage_devices"].write_text(
        '[[device]]\nname = "a"\nbandwidth = "fast"\n\n[[device]]\nname = "b"\n')
    paths["one_device"] = bad / "one.toml"
    paths["one_device"].write_text('[[device]]\nname = "only"\nspeed = 2\n')
    paths["tiny_devices"] = bad / "tiny.toml"
    paths["tiny_devices"].write_text(
        '[[device]]\nmemory = "1KiB"\n\n[[device]]\nmemory = "1KiB"\n')
    paths["no_workers"] = bad / "no-workers.toml"
    paths["no_workers"].write_text('[[device]]\nworkers = 0\n\n[[device]]\n')
    paths["empty_dir"] = bad / "empty"
    paths["empty_dir"].mkdir()
    paths["npz_missing"] = bad / "missing-input.npz"
    np.savez(paths["npz_missing"], image=np.zeros((1, 1, 28, 28), np.float32))
    paths["npz_dtype"] = bad / "float64.npz"
    np.savez(paths["npz_dtype"], Input3=np.zeros((1, 1, 28, 28), np.float64))
    paths["npz_shape"] = bad / "shape.npz"
    np.savez(paths["npz_shape"], Input3=np.zeros((1, 1, 27, 28), np.float32))
    return paths


BAD_INPUTS = {
    "missing-model": (["analyze", "{missing}"], r"not found"),
    # a path is printed as it is: "[/]" was Rich markup to close a style (a traceback) and
    # "[red]" vanished
    "markup-in-a-path": (["analyze", "{out}/[/]x[red].onnx"],
                         r"model file not found: .*/\[/\]x\[red\]\.onnx$"),
    "text-file-named-onnx": (["analyze", "{text_onnx}"], r"not .*ONNX"),
    "truncated-model": (["analyze", "{truncated}"], r"truncated"),
    "missing-external-data": (["analyze", "{no_external}"], r"external data.*w\.data.*missing"),
    "more-shards-than-nodes": (["plan", "{mnist}", "--shards", "100", "-o", "{out}/p.json"],
                               r"12 operators into 100 shards"),
    "quantize-data-with-plan": (["quantize", "{mnist}", "--method", "dynamic", "--plan",
                                 "{mnist_plan}", "--data", "random", "-o", "{out}/q"],
                                r"--tolerance and --data measure a whole model"),
    "quantize-stage-without-plan": (["quantize", "{mnist}", "--method", "dynamic", "--stage",
                                     "1", "-o", "{out}/q.onnx"], r"--stage .* --plan"),
    # values out of range, and options the others make meaningless: refused, not ignored
    "micro-batch-zero": (["run", "{mnist}", "--local", "--micro-batch", "0"],
                         r"--micro-batch.*0 is not in the range"),
    "port-out-of-range": (["serve", "{mnist}", "--local", "--port", "99999"],
                          r"--port.*99999 is not in the range"),
    "top-zero": (["analyze", "{mnist}", "--top", "0"], r"--top.*0 is not in the range"),
    "local-with-peer": (["run", "{mnist}", "--local", "--peer", "127.0.0.1:9"],
                        r"--local starts nodes .* --peer is for nodes started apart"),
    "local-with-keys": (["serve", "{mnist}", "--local", "--keys", "{out}"],
                        r"--local starts nodes .* --keys is for nodes started apart"),
    "shard-plan-and-strategy": (["shard", "{mnist}", "--plan", "{mnist_plan}", "--strategy",
                                 "even", "-o", "{out}/s"], r"--strategy plans the stages on the"),
    "dynamic-with-calib": (["quantize", "{mnist}", "--method", "dynamic", "--calib", "random",
                            "-o", "{out}/q.onnx"], r"--calib: dynamic quantizes without"),
    "verify-wrong-shape": (["verify", "{mnist}", "{mnist_shards}", "--inputs", "{wrong_shape}"],
                           r"'Input3' dimension 2 is fixed at 28, but the given shape says 16"),
    "verify-seed-and-inputs": (["verify", "{mnist}", "{mnist_shards}", "--inputs",
                                "{wrong_shape}", "--seed", "3"], r"--seed .* not with --inputs"),
    "zero-shards": (["plan", "{mnist}", "--shards", "0", "-o", "{out}/p.json"], r"0 shards"),
    "zero-shards-on-the-fly": (["shard", "{mnist}", "--shards", "0", "-o", "{out}"],
                               r"0 shards"),
    "input-shape-wrong-rank": (["analyze", "{mnist}", "--input-shape", "Input3=1x28x28"],
                               r"rank 4.*rank 3"),
    "input-shape-fixed-dim": (["analyze", "{mnist}", "--input-shape", "Input3=1x1x32x32"],
                              r"fixed at 28"),
    "input-shape-unknown-name": (["analyze", "{mnist}", "--input-shape", "image=1x1x28x28"],
                                 r"'image' is not an input.*Input3"),
    "input-shape-malformed": (["analyze", "{mnist}", "--input-shape", "Input3=1xax28"],
                              r"Input3=1xax28.*integers"),
    "input-shape-no-equals": (["analyze", "{mnist}", "--input-shape", "Input3"],
                              r"NAME=DIMS"),
    "plan-not-json": (["shard", "{mnist}", "--plan", "{not_json}", "-o", "{out}"],
                      r"not a plan file: not JSON"),
    # the model where the plan goes: says what to pass, not that the model is bad ONNX
    "plan-is-the-model": (["run", "{mnist}", "--local", "--plan", "{mnist}"],
                          r"mnist-8.onnx is not a plan file: not JSON .*; write one with "
                          r"'periphery plan MODEL -o plan.json'"),
    "plan-for-another-file": (["shard", "{mnist_copy}", "--plan", "{mnist_plan}", "-o", "{out}"],
                              r"another model"),
    "plan-for-another-model": (["shard", "{squeezenet}", "--plan", "{mnist_plan}", "-o",
                                "{out}"], r"another model|made for|plan"),
    "plan-missing": (["shard", "{mnist}", "--plan", "{out}/none.json", "-o", "{out}"],
                     r"plan file not found"),
    "shard-plan-and-shards": (["shard", "{mnist}", "--plan", "{mnist_plan}", "--shards", "2",
                               "-o", "{out}"], r"exactly one of --plan"),
    "shard-neither-plan-nor-shards": (["shard", "{mnist}", "-o", "{out}"],
                                      r"exactly one of --plan"),
    "devices-garbage": (["plan", "{mnist}", "--shards", "2", "--devices", "{garbage_devices}",
                         "-o", "{out}/p.json"], r"bandwidth 'fast'"),
    "devices-fewer-than-k": (["plan", "{mnist}", "--shards", "2", "--devices", "{one_device}",
                              "-o", "{out}/p.json"], r"2 stages needs 2 devices but 1 are"),
    "devices-missing": (["plan", "{mnist}", "--shards", "2", "--devices", "{out}/none.toml",
                         "-o", "{out}/p.json"], r"devices file not found"),
    "devices-memory-too-small": (["plan", "{mnist}", "--shards", "2", "--devices",
                                  "{tiny_devices}", "-o", "{out}/p.json"], r"memory"),
    "devices-no-workers": (["plan", "{mnist}", "--shards", "2", "--devices", "{no_workers}",
                            "-o", "{out}/p.json"], r"device 0 workers must be .* 1 to 256"),
    "verify-no-shards": (["verify", "{mnist}", "{empty_dir}"], r"stage-0\.onnx"),
    "verify-no-folder": (["verify", "{mnist}", "{out}/nowhere"], r"shard folder not found"),
    "verify-shards-of-another-model": (["verify", "{squeezenet}", "{mnist_shards}"],
                                       r"another model"),
    "inputs-npz-missing-input": (["verify", "{mnist}", "{mnist_shards}", "--inputs",
                                  "{npz_missing}"], r"no array named 'Input3'"),
    "inputs-npz-wrong-dtype": (["verify", "{mnist}", "{mnist_shards}", "--inputs",
                                "{npz_dtype}"], r"float64.*float32"),
    "inputs-npz-wrong-shape": (["verify", "{mnist}", "{mnist_shards}", "--inputs",
                                "{npz_shape}"], r"Input3"),
    "inputs-npz-missing-file": (["verify", "{mnist}", "{mnist_shards}", "--inputs",
                                 "{out}/none.npz"], r"inputs file not found"),
}


@pytest.mark.parametrize(("args", "pattern"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(files: dict[str, Path], tmp_path: Path, args: list[str],
                   pattern: str) -> None:
    result = cli(*(a.format(out=tmp_path, **files) for a in args))
    assert_bad_input(result, pattern)
