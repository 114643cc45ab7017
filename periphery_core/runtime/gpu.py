"""NVIDIA GPUs: which execution providers a `--device` asks for, and how busy a GPU is.

A node given `--device cuda:N` runs its stage on GPU N with ONNX Runtime's CUDA execution
provider, CPU as the fallback for operators CUDA lacks. Whether a GPU is usable is only known
by making a session and reading its providers (`get_available_providers()` describes the
build, not the hardware), so the node reads them and says when it fell back to the CPU.

Activations arrive and leave as bytes on the network, so each stage copies its inputs to the
GPU and its outputs back once per request; ONNX Runtime's `run` does exactly that with numpy
feeds. What need not cross the bus stays on the GPU: a decoder stage's KV caches, fed back
through an IOBinding step after step (generate/stateful.py), within a budget of a quarter of the
GPU's memory by default.

`onnxruntime-gpu[cuda,cudnn]` installs CUDA and cuDNN as Python packages, where the system's
loader does not look; `load_cuda_libraries` has ONNX Runtime load them before the first CUDA
session, so a node needs no LD_LIBRARY_PATH.

Use is read from `nvidia-smi`, which ships with the driver wherever a GPU is usable: no library
to install on hosts without one, and on them `gpu_usage` is None.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort
import psutil

from periphery_core.errors import PeripheryError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def parse_device(device: str) -> int | None:
    """`cpu` -> None, `cuda` -> 0, `cuda:N` -> N.

    Raises:
        PeripheryError: anything else.
    """
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    head, _, index = device.partition(":")
    if head == "cuda" and index.isdigit():
        return int(index)
    raise PeripheryError(f"device '{device}' is not cpu, cuda or cuda:N")


def providers_for(device: str) -> tuple[Any, ...]:
    """ONNX Runtime providers for a device: CUDA on GPU N (then the CPU), or the CPU."""
    index = parse_device(device)
    if index is None:
        return (CPU,)
    load_cuda_libraries()
    return ((CUDA, {"device_id": str(index)}), CPU)


_loaded: list[bool] = []


def load_cuda_libraries() -> None:
    """Once per process: ONNX Runtime loads the CUDA and cuDNN libraries that pip installed
    beside it (`preload_dlls`). Harmless where they live elsewhere, are missing, or this
    onnxruntime has no CUDA; what it prints is kept off the user's terminal (a missing
    library shows later, as the CPU fallback the node reports)."""
    if _loaded:
        return
    _loaded.append(True)
    # ONNX Runtime 1.31 warns on every CUDA session that no plugin EP is registered for it
    # (the built-in provider serves it); sessions log their own errors
    ort.set_default_logger_severity(3)
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload()


def memory_for_caches(device: str, index: int = 0) -> int:
    """The default KV cache budget of a decoder stage: a quarter of the memory its caches
    live in, the GPU's on CUDA, the host's otherwise."""
    usage = gpu_usage(index) if device == "cuda" else None
    total = usage.memory_total_bytes if usage is not None else psutil.virtual_memory().total
    return total // 4


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """One reading of a GPU: its use over the driver's last sample, and memory held."""

    percent: float
    memory_used_bytes: int
    memory_total_bytes: int


def gpu_usage(index: int, timeout: float = 2.0) -> GpuUsage | None:
    """GPU `index`'s use now, from `nvidia-smi`; None where there is none to ask."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run(
            [tool, f"--id={index}", "--query-gpu=utilization.gpu,memory.used,memory.total",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=True).stdout
        util, used, total = (float(x) for x in out.strip().splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return GpuUsage(util, int(used * 2**20), int(total * 2**20))
