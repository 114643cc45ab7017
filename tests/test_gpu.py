"""The CUDA path as far as a host without a GPU can check it: devices, providers, fallback.

benchmarks/gpu.py measures the rest on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from periphery_core.errors import PeripheryError
from periphery_core.generate.decoder import recognize
from periphery_core.generate.engine import TextCodec
from periphery_core.generate.stateful import StatefulStage, _host
from periphery_core.model import load_model
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.gpu import CPU, CUDA, gpu_usage, parse_device, providers_for
from periphery_core.runtime.session import SessionConfig
from tests.conftest import require_shared
from tests.models import mlp
from tests.test_cli import assert_bad_input, cli, ok
from tests.test_generate import GPT2, SMOLLM, _genai_greedy
from tests.test_generate_batching import _batched, _chain, _single

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-resnet.onnx"


@pytest.mark.parametrize(("device", "index"), [("cpu", None), ("cuda", 0), ("cuda:3", 3)])
def test_devices_name_a_gpu_index(device: str, index: int | None) -> None:
    assert parse_device(device) == index


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"])
def test_a_device_that_is_not_one_is_one_clear_error(device: str) -> None:
    with pytest.raises(PeripheryError, match="is not cpu, cuda or cuda:N"):
        parse_device(device)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_n_runs_on_gpu_n_and_falls_back_to_the_cpu() -> None:
    """`cuda:2` asks ONNX Runtime for GPU 2 (the index used to be dropped: every node ran on
    GPU 0); where CUDA is not usable, the session runs on the CPU and says so."""
    assert providers_for("cuda:2") == ((CUDA, {"device_id": "2"}), CPU)
    assert providers_for("cpu") == (CPU,)
    runner = StageRunner(mlp(width=8, layers=2),
                         SessionConfig(exact=False, providers=providers_for("cuda:2")))
    used = runner.session.get_providers()
    assert used[-1] == CPU
    out = runner.run({"x": np.ones((1, 8), np.float32)})
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has a GPU")
def test_no_gpu_means_no_gpu_figures() -> None:
    assert gpu_usage(0) is None


@pytest.mark.parametrize(("path", "exact"), [(SMOLLM, True), (GPT2, False)],
                         ids=["smollm2-packed", "gpt2-appended"])
def test_caches_kept_where_the_session_runs_equal_caches_on_the_host(path, exact: bool) -> None:
    """On a GPU a decoder stage keeps its KV caches in GPU memory, fed back through an
    IOBinding. The same code runs here with the CPU as the device: a 2-stage chain whose caches
    stay ONNX Runtime values gives the same logits (bit for bit on SmolLM2) and caches as one
    that keeps host arrays, through prompts, single steps, a batch run again on its own
    outputs (no copy), a reordered batch, a new member, and a sequence going on alone."""
    spec, host, kept = _chain(path, 2, on_device=True)
    assert all(s.on_device for s in kept) and not any(s.on_device for s in host)
    # left to itself, a stage keeps its caches on the device only where the session and the
    # attention that uses them run on a GPU: here, nowhere
    slots = kept[0].state.slots
    auto = StatefulStage(kept[0].runner, kept[0].state, 1 << 20)
    assert not auto.on_device and not kept[0].runner.resident_on_device(
        [s[0] for s in slots], [s[1] for s in slots])
    rng = np.random.default_rng(11)
    pos, last = {}, {}
    for seq, n in {1: 5, 2: 9, 3: 3, 4: 7}.items():
        ids = rng.integers(3, 900, (1, n)).tolist()
        a, b = _single(host, spec, ids, seq, 0), _single(kept, spec, ids, seq, 0)
        assert np.array_equal(a, b)
        last[seq], pos[seq] = int(a[0, -1].argmax()), n
    assert all(isinstance(v, ort.OrtValue) for v in kept[0]._seqs[1].cache.values())
    fed: list[dict] = []
    run_kept = kept[0].runner.run_kept

    def watched(feeds, keep):
        fed.append(dict(feeds))
        return run_kept(feeds, keep)

    kept[0].runner.run_kept = watched  # type: ignore[method-assign]
    schedule = ([1, 2, 3], [1, 2, 3], [1, 2, 3], [3, 1, 2], [3, 1, 2, 4], [2, 4], [1])
    for seqs in schedule:
        if len(seqs) == 1:
            a = _single(host, spec, [[last[seqs[0]]]], seqs[0], pos[seqs[0]])
            b = _single(kept, spec, [[last[seqs[0]]]], seqs[0], pos[seqs[0]])
        else:
            tokens, poss = [last[s] for s in seqs], [pos[s] for s in seqs]
            a = _batched(host, spec, tokens, seqs, poss)
            b = _batched(kept, spec, tokens, seqs, poss)
        if exact:
            assert np.array_equal(a, b), seqs
        else:
            np.testing.assert_allclose(a, b, atol=1e-5)
        for row, s in enumerate(seqs):
            last[s] = int(a[row, -1].argmax())
            pos[s] += 1
    slots = kept[0].state.slots
    if exact:  # packed: the repeated batch read its own outputs in place, still on the device
        assert all(isinstance(fed[i][p], ort.OrtValue) and fed[i][p] is not fed[i - 1][p]
                   for i in (1, 2) for p, *_ in slots)
    for a_stage, b_stage in zip(host, kept, strict=True):
        assert a_stage.cache_bytes == b_stage.cache_bytes and b_stage.sequences == 4
        for seq in pos:
            for name, value in a_stage._seqs[seq].cache.items():
                other = _host(b_stage._seqs[seq].cache[name])
                assert other.shape == value.shape
                np.testing.assert_allclose(other, value, atol=0 if exact else 1e-5)
    for stage in kept:
        stage.release([1, 2, 3, 4])
        assert stage.cache_bytes == 0 and stage._batches == {}


def _gpu_here() -> bool:
    try:
        runner = StageRunner(mlp(width=8, layers=1),
                             SessionConfig(exact=False, providers=providers_for("cuda")))
    except Exception:
        return False
    return runner.device == "cuda"


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_run_local_device_cuda_says_where_each_stage_ran(tmp_path: Path) -> None:
    """`periphery run --local --device cuda:0` starts its nodes on GPU 0 and says what each
    stage ran on: CUDA where a GPU is usable; here, without one, the CPU, every result still
    checked, and one warning line that says why."""
    plan = tmp_path / "plan.json"
    ok("plan", DEMO, "--shards", "2", "-o", plan)
    result = ok("run", DEMO, "--plan", plan, "--local", "--device", "cuda:0", "-n", "8",
                "--check", "--json")
    out = json.loads(result.stdout)
    assert out["check"]["passed"] and len(out["stages"]) == 2
    providers = {s["provider"] for s in out["stages"]}
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if _gpu_here():
        assert providers == {CUDA} and warning == []
    else:
        assert providers == {CPU}
        assert warning == ["warning: --device cuda:0, but stage 0, 1 ran on the CPU: no GPU "
                           "was usable (onnxruntime-gpu in place of onnxruntime, and an NVIDIA "
                           "driver; see the README)"]
    table = ok("run", DEMO, "--plan", plan, "--local", "-n", "4").stdout
    assert "runs on" in table and " CPU " in table and "warning" not in table


def test_device_is_for_local_nodes_and_must_be_one(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    ok("plan", DEMO, "--shards", "2", "-o", plan)
    assert_bad_input(cli("run", DEMO, "--plan", plan, "--device", "cuda"),
                     r"--device sets the --local nodes' device: give it with --local")
    assert_bad_input(cli("run", DEMO, "--plan", plan, "--local", "--device", "gpu"),
                     r"device 'gpu' is not cpu, cuda or cuda:N")
    assert_bad_input(cli("cluster", "up", "--device", "tpu"), "device 'tpu' is not cpu")
    require_shared()
    assert_bad_input(cli("generate", SMOLLM, "--prompt", "Hi", "--device", "cuda:1"),
                     r"--device sets the --local nodes' device")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_generate_local_device_cuda_generates(tmp_path: Path) -> None:
    """`periphery generate --local --device cuda`: onnxruntime-genai's greedy tokens, and
    one warning line where the nodes fell back to the CPU (here; on a GPU, benchmarks/gpu.py
    compares the two)."""
    require_shared()
    args = ("generate", SMOLLM, "--local", "--shards", "1", "--prompt", "What is 2 + 2?",
            "--max-new-tokens", "6", "--json")
    cuda = ok(*args, "--device", "cuda")
    spec = recognize(load_model(SMOLLM))
    assert spec is not None
    codec = TextCodec(spec.folder)
    expected = _genai_greedy(SMOLLM, [codec.encode(codec.prompt("What is 2 + 2?"))], 6,
                             spec.eos_ids)
    assert json.loads(cuda.stdout)["ids"] == expected[0] and len(expected[0]) == 6
    warned = [line for line in cuda.stderr.splitlines() if line.startswith("warning:")]
    assert warned == ([] if _gpu_here() else [
        "warning: --device cuda, but stage 0 ran on the CPU: no GPU was usable (onnxruntime-gpu "
        "in place of onnxruntime, and an NVIDIA driver; see the README)"])
