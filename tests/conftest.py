"""Shared test material: the corpus in ../shared/data and the onnx wheel's light models."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import onnx
import pytest

from periphery_core.cluster.keys import KEYS_ENV
from periphery_core.config_dir import CONFIG_ENV
from periphery_core.model import load_model
from periphery_core.model.analysis import ModelAnalysis, analyze
from periphery_core.model.loading import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MODELS = SHARED_DATA / "models"
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.fixture(autouse=True, scope="session")
def _a_config_folder_of_the_suite_s_own(tmp_path_factory: pytest.TempPathFactory
                                        ) -> Iterator[None]:
    """No test, nor any process a test starts, reads or writes the user's config folder (the
    app's recent models, the default cluster keys) or takes their $PERIPHERY_KEYS: a test of
    the app once left its temporary models in the user's recent list, and keys there would
    have secured every run a test expects to refuse."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CONFIG_ENV, str(tmp_path_factory.mktemp("config")))
        patch.delenv(KEYS_ENV, raising=False)
        yield


# Input shapes that exercise each corpus model beyond the all-ones defaults.
CORPUS_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "tiny-random-gpt2-past.onnx": {
        "input_ids": (2, 3), "position_ids": (2, 3), "attention_mask": (2, 7),
        **{f"past_{i}": (2, 2, 4, 4, 8) for i in range(5)},
    },
    "stories260K.onnx": {"tokens": (1, 16)},
    "all-MiniLM-L6-v2/model.onnx": {
        "input_ids": (2, 12), "attention_mask": (2, 12), "token_type_ids": (2, 12),
    },
    # a prompt of 5 tokens with no cache yet; the cache's head size is a symbolic dimension
    # ('kv_cache_dim') that no default can guess
    "smollm2-135m-instruct-int4/model.onnx": {
        "input_ids": (1, 5), "attention_mask": (1, 5),
        **{f"past_key_values.{i}.{kv}": (1, 3, 0, 64)
           for i in range(30) for kv in ("key", "value")},
    },
    "super-resolution.onnx": {"input": (2, 1, 224, 224)},
    "image-classifier32.onnx": {"modelInput": (3, 3, 32, 32)},
}


def corpus_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The input shapes a corpus model is tested with (None: its defaults)."""
    return CORPUS_SHAPES.get(path.name) or CORPUS_SHAPES.get(f"{path.parent.name}/{path.name}")


@lru_cache(maxsize=2)
def load_analyzed(path: Path) -> tuple[LoadedModel, ModelAnalysis]:
    """A model loaded and analysed at the shapes it is tested with. The last two are kept:
    tests work through one model at a time, and analysing a large one takes seconds."""
    loaded = load_model(path)
    return loaded, analyze(loaded, corpus_shapes(path))


def corpus_models() -> list[Path]:
    if not MODELS.is_dir():
        return []
    return sorted(MODELS.glob("*.onnx")) + sorted(MODELS.glob("*/model.onnx"))


def light_models() -> list[Path]:
    return sorted(LIGHT_DIR.glob("light_*.onnx"))


def require_shared() -> None:
    if not MODELS.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}: it sits beside the project "
                    "in CI")


@pytest.fixture(autouse=True)
def _close_app_controls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every cluster control the app creates in a test is closed when the test ends, pass or
    fail, so no master thread, port or local node process outlives a failing app test."""
    from periphery_app.control import ClusterControl

    created: list[ClusterControl] = []
    original = ClusterControl.__init__

    def tracking_init(self: ClusterControl, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        created.append(self)

    monkeypatch.setattr(ClusterControl, "__init__", tracking_init)
    # The app browses mDNS from its Cluster screen: in tests, on loopback only (no multicast
    # onto this machine's real networks).
    monkeypatch.setenv("PERIPHERY_MDNS_INTERFACES", "127.0.0.1")
    yield
    for control in created:
        control.close()
