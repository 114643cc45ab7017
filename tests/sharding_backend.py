"""An ONNX backend (`onnx.backend.base.Backend`) that shards every model and runs the chain.

`make_sharding_backend(k)` returns a Backend class for `onnx.backend.test.BackendTest`. Its
`prepare` applies the same gate as `onnxruntime.backend` (`onnx.checker.check_model`, then
ONNX Runtime's "released opsets only" rule, which skips the case) so that skips mirror the
plain backend. Its rep, on `run(inputs)`, analyses the model under the shapes of the inputs it
is given (analysis needs concrete shapes; done lazily, cached per input signature and shared
between backends of different K, since it does not depend on K), plans
min(K, node count) stages with `make_plan`, extracts the shards and runs them as a `LocalChain`,
returning the model's outputs in graph-output order, as `onnxruntime.backend` does.

Sessions use `SessionConfig(exact=False)`: ONNX Runtime's default optimisation level
(ORT_ENABLE_ALL), the one `onnxruntime.backend` gets from a default `SessionOptions`, so both
sides of a comparison run under the same settings.
"""

from __future__ import annotations

import hashlib
import unittest
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep
from onnxruntime.backend.backend import OnnxRuntimeBackend

from periphery_core.model.analysis import ModelAnalysis, analyze
from periphery_core.model.loading import LoadedModel
from periphery_core.model.shapes import graph_inputs
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.chain import LocalChain
from periphery_core.runtime.session import SessionConfig

# ORT_ENABLE_ALL, like the default SessionOptions of onnxruntime.backend.
DEFAULT_CONFIG = SessionConfig(exact=False)

# Analyses are independent of K: backends for different K share them (model digest, shapes).
_ANALYSES: OrderedDict[tuple[str, tuple], ModelAnalysis] = OrderedDict()
_ANALYSES_KEPT = 8


def _analysis(loaded: LoadedModel, digest: str, feeds: dict[str, Any]) -> ModelAnalysis:
    # The real feeds go in: where ONNX cannot type a tensor, the analysis runs the model once,
    # and shapes may depend on input values (a size input, split lengths).
    key = (digest, tuple(sorted((n, _signature(v)) for n, v in feeds.items())))
    found = _ANALYSES.get(key)
    if found is None:
        found = analyze(loaded, feeds=feeds)
        _ANALYSES[key] = found
        while len(_ANALYSES) > _ANALYSES_KEPT:
            _ANALYSES.popitem(last=False)
    return found


def _signature(value: Any) -> tuple:
    """A hashable description of one input: its dtype and shape, recursively for sequences."""
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape)
    if isinstance(value, (list, tuple)):
        return ("sequence", tuple(_signature(v) for v in value))
    if value is None:
        return ("none",)
    return ("other", type(value).__name__)


def _checker_ok(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:  # the model may still run in ONNX Runtime; shards are then not held to it
        return False
    return True


class ShardedRep(BackendRep):
    """A model prepared for sharded execution; the shards are built per input signature."""

    def __init__(self, model: onnx.ModelProto, k: int, config: SessionConfig) -> None:
        self.model = model
        self.k = k
        self.config = config
        self.input_names = [vi.name for vi in graph_inputs(model)]
        self.output_names = [o.name for o in model.graph.output]
        self.digest = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
        self._loaded: LoadedModel | None = None
        self._chains: dict[tuple, LocalChain] = {}
        self.stages_used: dict[tuple, int] = {}  # signature -> number of stages actually planned

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = LoadedModel(
                path=Path(f"{self.model.graph.name or 'model'}.onnx"),
                proto=self.model,
                sha256=self.digest,
                has_external_data=False,
                checker_ok=_checker_ok(self.model),
            )
        return self._loaded

    def _feeds(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, dict):
            return dict(inputs)
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if len(inputs) != len(self.input_names):
            raise RuntimeError(
                f"the model expects {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        return dict(zip(self.input_names, inputs, strict=True))

    def chain_for(self, feeds: dict[str, Any]) -> LocalChain:
        signature = tuple((name, _signature(v)) for name, v in feeds.items())
        chain = self._chains.get(signature)
        if chain is None:
            analysis = _analysis(self.loaded, self.digest, feeds)
            k = min(self.k, len(analysis.nodes))
            plan = make_plan(analysis, k, strategy="balanced")
            shards = extract_shards(self.loaded, analysis, plan)
            chain = LocalChain(shards, self.config)
            self._chains[signature] = chain
            self.stages_used[signature] = k
        return chain

    def run(self, inputs: Any, **kwargs: Any) -> list[Any]:
        feeds = self._feeds(inputs)
        values = self.chain_for(feeds).run(feeds)
        missing = [n for n in self.output_names if n not in values]
        if missing:
            raise RuntimeError(f"the chain did not produce the model output '{missing[0]}'")
        return [values[n] for n in self.output_names]


def make_sharding_backend(k: int, config: SessionConfig = DEFAULT_CONFIG) -> type[Backend]:
    """A Backend class that cuts every model into min(k, node count) shards."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")

    class ShardingBackend(Backend):
        shards = k
        session_config = config

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device == "CPU"

        @classmethod
        def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
            return cls.supports_device(device or "CPU")

        @classmethod
        def prepare(
            cls, model: onnx.ModelProto | str | bytes, device: str = "CPU", **kwargs: Any
        ) -> ShardedRep:
            if device is not None and not cls.supports_device(device):
                raise RuntimeError(f"sharding backend runs on CPU only, not on '{device}'")
            if isinstance(model, bytes):
                model = onnx.load_from_string(model)
            elif isinstance(model, str):
                model = onnx.load(model)
            # The same gate as onnxruntime.backend.prepare, so that skips mirror it.
            onnx.checker.check_model(model)
            ok, message = OnnxRuntimeBackend.is_opset_supported(model)
            if not ok:
                raise unittest.SkipTest(message)
            return ShardedRep(model, cls.shards, cls.session_config)

        @classmethod
        def run_model(
            cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any
        ) -> list[Any]:
            return cls.prepare(model, device, **kwargs).run(inputs)

        @classmethod
        def run_node(cls, node: Any, inputs: Any, device: str = "CPU", **kwargs: Any) -> Any:
            raise NotImplementedError("the sharding backend runs whole models only")

    ShardingBackend.__name__ = ShardingBackend.__qualname__ = f"ShardingBackendK{k}"
    return ShardingBackend
