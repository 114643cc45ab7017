"""The CUDA path as far as a host without a GPU can check it: devices, providers, fallback.

benchmarks/gpu.py measures the rest on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from periphery_core.errors import PeripheryError
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.gpu import CPU, CUDA, gpu_usage, parse_device, providers_for
from periphery_core.runtime.session import SessionConfig
from tests.models import mlp


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
