"""The local chain executor: run a model's shards in order in ONNX Runtime.

Each stage receives exactly its boundary inputs and hands on exactly its boundary outputs, as a
pipeline node would; the cluster runtime reuses `StageRunner` for one stage.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
import onnx
import onnxruntime as ort

from periphery_core.errors import FeedError
from periphery_core.runtime.session import SessionConfig, make_session, run_bound, run_session

Value: TypeAlias = np.ndarray | ort.OrtValue
"""A stage input: a host array, or an OrtValue a run of this stage left on its device."""


class StageRunner:
    """One shard in one ONNX Runtime session."""

    def __init__(
        self, shard: onnx.ModelProto | str | os.PathLike[str], config: SessionConfig | None = None,
        serialized: bytes | None = None,
    ) -> None:
        """`serialized`: the bytes `shard` was parsed from, where the caller has them (see
        `make_session`)."""
        with tempfile.TemporaryDirectory(prefix="periphery-stage-") as tmp:
            self.session = make_session(shard, config, scratch_dir=Path(tmp),
                                        serialized=serialized)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # IR 3 models list initializers among their inputs: those are not fed.
        proto = shard if isinstance(shard, onnx.ModelProto) else onnx.load(
            str(shard), load_external_data=False
        )
        inits = {i.name for i in proto.graph.initializer}
        self.input_names = [n for n in self.input_names if n not in inits]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # "cuda" when the session runs on a GPU (CUDA listed first and usable), else "cpu"
        used = self.session.get_providers()[0]
        self.device = "cuda" if used == "CUDAExecutionProvider" else "cpu"
        options = self.session.get_provider_options().get(used, {})
        self.device_id = int(options.get("device_id", 0) or 0)

    def resident_on_device(self, inputs: list[str], outputs: list[str]) -> bool:
        """Whether these inputs are read, and these outputs made, in the GPU's memory: the
        session runs on a GPU and the operators that use them run there too (not on the CPU
        it falls back to for what the GPU lacks). ONNX Runtime says where it expects each
        input and puts each output; an older one that cannot say is trusted to run them where
        its session runs."""
        if self.device == "cpu":
            return False
        try:
            ins = self.session.get_input_memory_infos()
            outs = self.session.get_output_memory_infos()
        except AttributeError:
            return True
        if ins is None or outs is None:
            return True
        where = {i.name: m.name for i, m in zip(self.session.get_inputs(), ins, strict=True)}
        where |= {o.name: m.name for o, m in zip(self.session.get_outputs(), outs, strict=True)}
        return all(where.get(n, "Cpu").lower() not in ("cpu", "cudapinned")
                   for n in [*inputs, *outputs])

    def run_kept(self, values: Mapping[str, Value], keep: frozenset[str] | set[str]
                 ) -> tuple[dict[str, np.ndarray], dict[str, ort.OrtValue]]:
        """Run with the outputs named in `keep` left where the session made them (GPU memory
        on CUDA) as OrtValues, and the rest copied to host arrays; an input may be such an
        OrtValue, read in place. A decoder stage feeds its KV caches back this way, so on a
        GPU they never cross the PCIe bus between steps."""
        return run_bound(self.session, self._feeds(values), self.output_names, keep,
                         self.device, self.device_id)

    def run(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = run_session(self.session, self._feeds(values), self.output_names)
        return dict(zip(self.output_names, outs, strict=True))

    def _feeds(self, values: Mapping[str, Value]) -> dict[str, Value]:
        """This stage's inputs among `values`; one clear error for one that is missing."""
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise FeedError(f"stage input '{missing[0]}' was not provided")
        return {n: values[n] for n in self.input_names}


class LocalChain:
    """Run shards one after another in this process."""

    def __init__(
        self,
        shards: Sequence[onnx.ModelProto | str | os.PathLike[str]],
        config: SessionConfig | None = None,
    ) -> None:
        self.stages = [StageRunner(s, config) for s in shards]

    @property
    def output_names(self) -> list[str]:
        return self.stages[-1].output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values: Mapping[str, np.ndarray] = feeds
        for stage in self.stages:
            values = stage.run(values)
        return dict(values)
