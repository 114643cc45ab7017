"""Every corpus model, cut into K = 2, 3, 4, 8 shards, runs bit-identically to the whole model."""

from __future__ import annotations

from pathlib import Path

import pytest

from periphery_core.partition.extract import extract_shards
from periphery_core.partition.planner import make_plan
from periphery_core.partition.verify import verify_chain
from periphery_core.runtime.feeds import random_feeds
from tests.conftest import corpus_models, light_models, load_analyzed, require_shared

KS = (2, 3, 4, 8)


def _check(path: Path, k: int, strategy: str = "balanced") -> None:
    loaded, analysis = load_analyzed(path)
    k = min(k, len(analysis.nodes))
    plan = make_plan(analysis, k, strategy=strategy)
    shards = extract_shards(loaded, analysis, plan)
    assert len(shards) == k
    feeds = random_feeds(analysis.inputs, seed=k)
    report = verify_chain(loaded.proto, shards, feeds, exact=True)
    bad = [o.name for o in report.outputs if not o.bit_identical]
    assert report.passed, f"{path.name} K={k}: outputs differ: {bad}"


CORPUS = corpus_models()


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("path", CORPUS, ids=[p.parent.name if p.name == "model.onnx" else p.stem
                                             for p in CORPUS])
def test_corpus_model_exact(path: Path, k: int) -> None:
    require_shared()
    _check(path, k)


def test_corpus_present() -> None:
    require_shared()
    assert len(CORPUS) >= 12, [p.name for p in CORPUS]


LIGHT = light_models()


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("path", LIGHT, ids=[p.stem for p in LIGHT])
def test_light_model_exact(path: Path, k: int) -> None:
    _check(path, k)


def test_nine_light_models() -> None:
    assert len(LIGHT) == 9


@pytest.mark.parametrize("strategy", ["even", "spectral"])
@pytest.mark.parametrize("name", ["light_squeezenet_randw.onnx", "fastestdet.onnx",
                                  "tiny-random-gpt2-past.onnx"])
def test_other_strategies_exact(name: str, strategy: str) -> None:
    require_shared()
    from tests.conftest import MODELS

    _check(MODELS / name, 3, strategy)
