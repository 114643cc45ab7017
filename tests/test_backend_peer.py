"""Peer suite: ONNX's backend tests, sharded into K = 2 and 3 stages, pass exactly where plain
`onnxruntime.backend` passes.

Cases: node cases whose model has two or more nodes in its main graph, and every case of the
simple, pytorch-converted and pytorch-operator groups. Each case is run through
`onnx.backend.test.BackendTest` (the public route: one runner per backend, its unittest classes,
the `test_<name>_cpu` method run by unittest) for plain `onnxruntime.backend` and for
`tests.sharding_backend.make_sharding_backend(k)`, and the outcomes (pass, fail, skip) must be
the same. Both sides run ONNX Runtime at its default optimisation level (ORT_ENABLE_ALL): the
plain backend gets it from a default `SessionOptions`, the sharded one from
`SessionConfig(exact=False)`; each case's own rtol/atol decide.
"""

from __future__ import annotations

import unittest
import warnings
from dataclasses import dataclass
from functools import cache

import onnxruntime.backend
import pytest
from onnx.backend.test import BackendTest
from onnx.backend.test.loader import load_model_tests

from tests.sharding_backend import ShardedRep, make_sharding_backend

KS = (2, 3)

# load_model_tests kind -> the BackendTest category (unittest class) holding its cases.
GROUPS = {
    "node": "OnnxBackendNodeModelTest",
    "simple": "OnnxBackendSimpleModelTest",
    "pytorch-converted": "OnnxBackendPyTorchConvertedModelTest",
    "pytorch-operator": "OnnxBackendPyTorchOperatorModelTest",
}


@dataclass(frozen=True)
class Case:
    group: str
    name: str  # e.g. test_add_bcast, without the device suffix

    @property
    def id(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass(frozen=True)
class Outcome:
    status: str  # "pass", "fail" or "skip"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def _collect() -> list[Case]:
    cases: list[Case] = []
    with warnings.catch_warnings():  # generating node cases warns about overflows on purpose
        warnings.simplefilter("ignore")
        for group in GROUPS:
            for tc in load_model_tests(kind=group):
                # Node cases carry their model in memory (onnx >= 1.16 generates them).
                if group == "node" and (tc.model is None or len(tc.model.graph.node) < 2):
                    continue
                cases.append(Case(group, tc.name))
    return cases


CASES = _collect()


@cache
def _test_cases(backend_key: str | int) -> dict[str, type[unittest.TestCase]]:
    """The BackendTest unittest classes for one backend, built once per session."""
    backend = onnxruntime.backend if backend_key == "plain" else make_sharding_backend(backend_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BackendTest(backend, __name__).test_cases


def _outcome(backend_key: str | int, case: Case) -> Outcome:
    test = _test_cases(backend_key)[GROUPS[case.group]](f"{case.name}_cpu")
    result = unittest.TestResult()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test.run(result)
    if result.skipped:
        return Outcome("skip", result.skipped[0][1])
    problems = result.errors + result.failures
    if problems:
        lines = problems[0][1].strip().splitlines()
        return Outcome("fail", lines[-1] if lines else "")
    return Outcome("pass")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sharded_backend_matches_plain(case: Case) -> None:
    plain = _outcome("plain", case)
    for k in KS:
        sharded = _outcome(k, case)
        assert sharded.status == plain.status, (
            f"{case.id}: plain onnxruntime.backend -> {plain}; sharded K={k} -> {sharded}"
        )
        if plain.status == "skip":
            assert sharded.detail == plain.detail, f"{case.id} K={k}: skip reasons differ"
    if plain.status == "skip":
        pytest.skip(f"both skip: {plain.detail}")


def test_case_groups_are_populated() -> None:
    """Guards the filter: a loader change must not silently empty a group."""
    counts = {g: sum(1 for c in CASES if c.group == g) for g in GROUPS}
    assert all(n > 0 for n in counts.values()), counts
    assert counts["node"] >= 100, counts


def test_sharding_backend_really_cuts_models() -> None:
    """The peer backend is not a pass-through: a model of >= 3 nodes runs as 3 stages."""
    tc = next(t for t in load_model_tests(kind="node") if t.name == "test_softmax_example_expanded")
    inputs, expected = tc.data_sets[0]
    rep = make_sharding_backend(3).prepare(tc.model, "CPU")
    assert isinstance(rep, ShardedRep)
    outputs = rep.run(list(inputs))
    assert list(rep.stages_used.values()) == [3]
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected, strict=True):
        assert got.shape == want.shape
        assert got.dtype == want.dtype
