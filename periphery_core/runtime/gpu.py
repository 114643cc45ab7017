"""NVIDIA GPUs: which execution providers a `--device` asks for, and how busy a GPU is.

A node given `--device cuda:N` runs its stage on GPU N with ONNX Runtime's CUDA execution
provider, CPU as the fallback for operators CUDA lacks. Whether a GPU is usable is only known
by making a session and reading its providers (`get_available_providers()` describes the
build, not the hardware), so the node reads them and says when it fell back to the CPU.

Activations arrive and leave as bytes on the network, so each stage copies its inputs to the
GPU and its outputs back once per request; ONNX Runtime's `run` does exactly that with numpy
feeds (binding them by hand with IOBinding measured no faster on the CPU path; no GPU was at
hand to measure it there).

Use is read from `nvidia-smi`, which ships with the driver wherever a GPU is usable: no library
to install on hosts without one, and on them `gpu_usage` is None.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

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
    return ((CUDA, {"device_id": str(index)}), CPU)


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
