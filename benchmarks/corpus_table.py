"""The wheel-corpus check matrix as a markdown table (the README's table of real models).

For each model in tests/corpus/manifest.toml it runs the `periphery` CLI in subprocesses, as a
user would (tests/corpus/matrix.py): shard + verify --exact at K = 2 and 4 (K = 2 only below
12 top-level nodes) on the model's real feeds; shard without feeds (works, or refuses in one
line); quantize --method dynamic, then evaluate against fp32 on the same feeds (size ratio,
min cosine over outputs), or the one-line refusal. Missing models are fetched and their feeds
written first (tests/corpus/fetch.py, tests/corpus/feeds.py).

Run from the repository root: `python benchmarks/corpus_table.py [--only NAME ...] > table.md`.
The table goes to stdout, then "N of M models: every step acceptable" and any problem; progress
goes to stderr. Nothing is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.corpus.fetch import CorpusError, fetch, load_manifest  # noqa: E402
from tests.corpus.matrix import (  # noqa: E402
    ModelResult,
    Outcome,
    check_model,
    feeds_file,
    subprocess_runner,
)

WIDTH = 90
HEADER = ("model", "package", "exporter", "shard + verify --exact", "shard without feeds",
          "quantize dynamic", "evaluate (min cosine)")


def _short(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _exact(result: ModelResult) -> str:
    cells = []
    for k in (2, 4):
        outcome = result.exact.get(k)
        cells.append(f"K={k} " + ("n/a" if outcome is None else
                                  "pass" if outcome.status == "pass" else "FAIL"))
    return ", ".join(cells)


def _step(outcome: Outcome, passed: str) -> str:
    if outcome.status == "pass":
        return passed
    prefix = "refused: " if outcome.status == "refused" else "FAIL: "
    return _short(prefix + outcome.line)


def _evaluate(result: ModelResult) -> str:
    if result.evaluate is None:
        return "—"
    if result.evaluate.status != "pass" or result.min_cosine is None:
        return "FAIL"
    return f"{result.min_cosine:.5f}"


def row(entry: dict[str, Any], result: ModelResult) -> list[str]:
    ratio = "ok" if result.size_ratio is None else f"{result.size_ratio:.2f}x fp32"
    return [
        entry["name"], (f"{entry['package']}=={entry['version']}" if "shared" not in entry
                         else f"../shared/data/{entry['shared']}"), entry["producer"],
        _exact(result), _step(result.nofeeds, "ok"), _step(result.quantize, ratio),
        _evaluate(result),
    ]


def prepare(names: list[str]) -> None:
    """Fetch the models and write feeds.npz where it is missing (their lines go to stderr)."""
    from tests.corpus.feeds import write_all

    with contextlib.redirect_stdout(sys.stderr):
        fetch(names)
        missing = [n for n in names if not feeds_file(n).is_file()]
        if missing:
            for line in write_all(missing):
                print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    args = parser.parse_args()
    entries = load_manifest()
    if args.only:
        unknown = sorted(set(args.only) - {e["name"] for e in entries})
        if unknown:
            parser.error(f"unknown model name(s): {', '.join(unknown)}")
        entries = [e for e in entries if e["name"] in args.only]
    try:
        prepare([e["name"] for e in entries])
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    results: list[tuple[dict[str, Any], ModelResult]] = []
    for entry in entries:
        print(f"checking {entry['name']} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="periphery-corpus-") as tmp:
            results.append((entry, check_model(entry, Path(tmp), subprocess_runner)))

    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for entry, result in results:
        print("| " + " | ".join(_cell(c) for c in row(entry, result)) + " |")
    good = sum(not r.problems for _, r in results)
    print()
    print(f"{good} of {len(results)} models: every step acceptable")
    for entry, result in results:
        for problem in result.problems:
            print(f"- {entry['name']}: {problem}")
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
