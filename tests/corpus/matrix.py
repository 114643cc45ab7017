"""The corpus check matrix: what `periphery` does with each wheel-corpus model, step by step.

`check_model(entry, workdir, run)` runs, through `run` (the `periphery` CLI, in a subprocess or
in process), for the model at `model_path(name)` and its `<cache>/<name>/feeds.npz`:

a. for K = 2 and 4 (K = 2 only below 12 top-level nodes): `shard --shards K --inputs FEEDS`,
   then `verify --exact --inputs FEEDS` (with `--json`, to name differing outputs);
b. `shard --shards 2` without feeds: exit 0, or exit 2 with exactly one line that is not an
   internal error;
c. `quantize --method dynamic --inputs FEEDS`: exit 0, then `evaluate --data FEEDS --json`
   (min cosine over outputs, size ratio); or exit 2 with one line ("refused: ...").

"internal error" or "Traceback" anywhere in a step's output is a failure. Each failure is one
entry of `ModelResult.problems` (empty: every step acceptable). Used by
tests/test_wheel_corpus.py (in process) and benchmarks/corpus_table.py (subprocess).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from tests.corpus.fetch import corpus_dir, model_path

Runner = Callable[[list[str]], tuple[int, str]]

KS = (2, 4)
MIN_NODES_FOR_K4 = 12
TIMEOUT_S = 300
BAD_MARKERS = ("internal error", "Traceback")


@dataclass
class Outcome:
    """One step: `status` is "pass", "refused" (exit 2, one acceptable line) or "fail";
    `line` is the refusal or the first error line."""

    status: str
    line: str = ""


@dataclass
class ModelResult:
    name: str
    nodes: int
    exact: dict[int, Outcome] = field(default_factory=dict)  # K -> shard + verify --exact
    nofeeds: Outcome = field(default_factory=lambda: Outcome("fail", "not run"))
    quantize: Outcome = field(default_factory=lambda: Outcome("fail", "not run"))
    evaluate: Outcome | None = None  # None when quantize did not write a model
    size_ratio: float | None = None
    min_cosine: float | None = None
    problems: list[str] = field(default_factory=list)


def feeds_file(name: str) -> Path:
    return corpus_dir() / name / "feeds.npz"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _bad(text: str) -> bool:
    return any(marker in text for marker in BAD_MARKERS)


def _error_line(text: str) -> str:
    """The first `error:` line (without the prefix), else the first line of a traceback's end,
    else the last non-empty line."""
    lines = _lines(text)
    for line in lines:
        if line.lower().startswith("error:"):
            return line[len("error:"):].strip()
    if "Traceback" in text and lines:
        return lines[-1]
    return lines[-1] if lines else "(no output)"


def _json_in(text: str) -> Any:
    """The JSON document printed by `--json` (stdout comes before stderr in a runner's text)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in output")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def _one_line_refusal(code: int, text: str) -> str | None:
    """The single line of an acceptable exit-2 refusal, or None when it is not one."""
    lines = _lines(text)
    if code != 2 or len(lines) != 1 or _bad(text):
        return None
    line = lines[0]
    return line[len("error:"):].strip() if line.lower().startswith("error:") else line


def _shard_verify(model: str, feeds: str, k: int, workdir: Path, run: Runner) -> Outcome:
    out = str(workdir / f"k{k}")
    code, text = run(["shard", model, "--shards", str(k), "--inputs", feeds, "-o", out])
    if code != 0 or _bad(text):
        return Outcome("fail", f"shard exit {code}: {_error_line(text)}")
    code, text = run(["verify", model, out, "--exact", "--inputs", feeds, "--json"])
    if code == 0 and not _bad(text):
        return Outcome("pass")
    if code == 1 and not _bad(text):
        try:
            report = _json_in(text)
            differ = [o["name"] for o in report["outputs"] if not o["bit_identical"]]
            return Outcome("fail", f"verify exit 1: not bit-identical: {', '.join(differ)}")
        except (ValueError, KeyError, TypeError):
            pass
    return Outcome("fail", f"verify exit {code}: {_error_line(text)}")


def _nofeeds(model: str, workdir: Path, run: Runner) -> Outcome:
    code, text = run(["shard", model, "--shards", "2", "-o", str(workdir / "nofeeds")])
    if code == 0 and not _bad(text):
        return Outcome("pass")
    refusal = _one_line_refusal(code, text)
    if refusal is not None:
        return Outcome("refused", refusal)
    return Outcome("fail", f"exit {code}: {_error_line(text)}")


def _min_cosine(report: dict[str, Any]) -> float:
    cosines = [float(o["cosine"]) for o in report["outputs"] if o.get("cosine") is not None]
    if not cosines:
        return math.nan
    return math.nan if any(math.isnan(c) for c in cosines) else min(cosines)


def check_model(entry: dict[str, Any], workdir: Path, run: Runner) -> ModelResult:
    """Run the matrix for one manifest entry; outputs go under `workdir`."""
    name = entry["name"]
    model, feeds = str(model_path(name)), str(feeds_file(name))
    nodes = len(onnx.load(model, load_external_data=False).graph.node)
    result = ModelResult(name=name, nodes=nodes)
    for k in KS if nodes >= MIN_NODES_FOR_K4 else KS[:1]:
        result.exact[k] = outcome = _shard_verify(model, feeds, k, workdir, run)
        if outcome.status != "pass":
            result.problems.append(f"K={k} shard+verify --exact: {outcome.line}")
    result.nofeeds = _nofeeds(model, workdir, run)
    if result.nofeeds.status == "fail":
        result.problems.append(f"shard without feeds: {result.nofeeds.line}")

    quantized = str(workdir / "q.onnx")
    code, text = run(["quantize", model, "--method", "dynamic", "--inputs", feeds,
                      "-o", quantized])
    refusal = _one_line_refusal(code, text)
    if code == 0 and not _bad(text):
        result.quantize = Outcome("pass")
    elif refusal is not None:
        result.quantize = Outcome("refused", refusal)
    else:
        result.quantize = Outcome("fail", f"exit {code}: {_error_line(text)}")
        result.problems.append(f"quantize dynamic: {result.quantize.line}")
    if result.quantize.status != "pass":
        return result

    code, text = run(["evaluate", model, quantized, "--inputs", feeds, "--latency-runs", "3",
                      "--json"])
    try:
        if code != 0 or _bad(text):
            raise ValueError(f"exit {code}: {_error_line(text)}")
        report = _json_in(text)
        result.min_cosine = _min_cosine(report)
        result.size_ratio = float(report["size_ratio"])
        result.evaluate = Outcome("pass")
    except (ValueError, KeyError, TypeError) as exc:
        result.evaluate = Outcome("fail", str(exc))
        result.problems.append(f"evaluate: {exc}")
    return result


# ---------------------------------------------------------------- runners


def subprocess_runner(args: list[str]) -> tuple[int, str]:
    """`python -m periphery_core.cli.main ARGS...` in a child process; stdout, then stderr."""
    env = {**os.environ, "COLUMNS": "200"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "periphery_core.cli.main", *args],
            capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        return 124, f"error: timed out after {TIMEOUT_S} s: periphery {' '.join(args)}"
    return proc.returncode, proc.stdout + proc.stderr


def inprocess_runner(args: list[str]) -> tuple[int, str]:
    """The click group `cli` through click's CliRunner; stdout, then stderr.

    click >= 8.2 always keeps stderr apart (`mix_stderr` is gone); click 8.1 needs
    `mix_stderr=False`. CliRunner turns `sys.exit(n)` into `exit_code`; an exception that
    escapes the command is appended as its traceback (so it counts as a failure).
    """
    from click.testing import CliRunner

    import periphery_core.cli.main  # noqa: F401  (registers the subcommands on `cli`)
    from periphery_core.cli.common import cli

    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(cli, args, env={"COLUMNS": "200"}, prog_name="periphery")
    text = result.stdout + result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        text += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        code = code or 1
    return code, text
