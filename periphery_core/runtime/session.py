"""The one place ONNX Runtime sessions are made.

`exact=True` disables graph optimizations: fusions cannot cross a shard boundary, so only then
are a chain of shards and the whole model bit-identical. Models too big for one protobuf are
passed to ONNX Runtime by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from periphery_core.errors import RuntimeFailure
from periphery_core.model import loading


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How to build a session. The same config on both sides makes results comparable."""

    exact: bool = True
    threads: int = 0  # 0: ONNX Runtime's default
    # Names, or (name, options) as ONNX Runtime takes them (runtime.gpu.providers_for).
    providers: tuple[str | tuple[str, dict[str, str]], ...] = ("CPUExecutionProvider",)
    profile_prefix: str | None = None
    # ONNX Runtime's threads spin between the operators of a run (fast), and by default for a
    # while after it too. Stopping them when a run ends leaves the cores to whoever shares them
    # while this session waits for its next request: the other stages of a local cluster, the
    # master. Measured on SmolLM2 decode, 2 cores: K = 2 local stages 78 -> 109 tokens/s, one
    # stage unchanged (benchmarks/generate.py).
    stop_spinning: bool = True


def session_options(config: SessionConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if config.exact
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    if config.threads:
        opts.intra_op_num_threads = config.threads
        opts.inter_op_num_threads = 1
    if config.stop_spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if config.profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = config.profile_prefix
    return opts


def make_session(
    model: onnx.ModelProto | str | os.PathLike[str],
    config: SessionConfig | None = None,
    scratch_dir: Path | None = None,
    serialized: bytes | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session for a model proto or file.

    A proto too large to serialize is saved with external data into `scratch_dir` first.
    `serialized`: the proto's own bytes, where the caller has them (a node, the shard it
    received). ONNX Runtime reads them as they are: serialising a big proto again holds
    Python's interpreter lock throughout (1.4 s for 250 MB here), and a node whose control
    thread cannot answer its master's heartbeats for 2.5 s is declared lost.
    """
    config = config or SessionConfig()
    opts = session_options(config)
    source: str | bytes
    if serialized is not None:
        source = serialized
    elif isinstance(model, onnx.ModelProto):
        if loading.approx_size(model) >= loading.EXTERNAL_DATA_THRESHOLD:
            if scratch_dir is None:
                raise RuntimeFailure("model too large to run from memory: give a scratch folder")
            target = scratch_dir / "model.onnx"
            loading.save_model(model, target)
            source = str(target)
        else:
            source = model.SerializeToString()
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=list(config.providers))
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise RuntimeFailure(f"ONNX Runtime cannot load the model: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    """ONNX Runtime's message, first line; of a chain of nested node failures (an If running a
    Reshape), the innermost, which says what went wrong."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if line.count("Status Message:") > 1:
        outer, _, inner = line.rpartition("Status Message:")
        node = outer.rpartition("running ")[2].rstrip(". ")
        line = f"{node}: {inner.strip()}"
    return line[:300]


# Failures reach the caller as one RuntimeFailure; ONNX Runtime need not also print them.
_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4


def run_session(sess: ort.InferenceSession, feeds: dict, outputs: list[str] | None = None) -> list:
    """Run a session; numpy scalars among the feeds are passed as 0-d arrays.

    A scalar value (a 0-d tensor indexed with `[()]`, a user's `np.float32(1.0)`) is a numpy
    scalar, not an array, and ONNX Runtime 1.32 refuses those; every value that crosses a shard
    boundary or the wire reaches ONNX Runtime through here.
    """
    feeds = {n: np.asarray(v) if isinstance(v, np.generic) else v for n, v in feeds.items()}
    try:
        return sess.run(outputs, feeds, _QUIET_RUN)
    except Exception as exc:
        raise RuntimeFailure(f"ONNX Runtime failed while running: {_short(exc)}") from None


def run_bound(sess: ort.InferenceSession, feeds: dict, outputs: list[str],
              keep: frozenset[str] | set[str], device: str, device_id: int = 0
              ) -> tuple[dict[str, np.ndarray], dict[str, ort.OrtValue]]:
    """Run through an IOBinding: host arrays and OrtValues in; the outputs in `keep` stay on
    `device` as OrtValues, the others come back as host arrays (see StageRunner.run_kept)."""
    binding = sess.io_binding()
    held = []  # host arrays must outlive the run
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            array = np.ascontiguousarray(value)
            held.append(array)
            binding.bind_cpu_input(name, array)
    for name in outputs:
        if name in keep:
            binding.bind_output(name, device, device_id)
        else:
            binding.bind_output(name, "cpu")
    try:
        sess.run_with_iobinding(binding, _QUIET_RUN)
    except Exception as exc:
        raise RuntimeFailure(f"ONNX Runtime failed while running: {_short(exc)}") from None
    values = binding.get_outputs()
    host = {n: v.numpy() for n, v in zip(outputs, values, strict=True) if n not in keep}
    kept = {n: v for n, v in zip(outputs, values, strict=True) if n in keep}
    del held
    return host, kept
