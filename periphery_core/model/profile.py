"""Measured node costs: run the model in ONNX Runtime with profiling on.

Graph optimizations are off so every ONNX node is one ORT node; nodes are renamed to their
analysis keys in a private copy, so names that are empty or repeated in the file still map back.
The median over several runs, after a warm-up, is the node's measured time.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from periphery_core.model.analysis import ModelAnalysis, with_measurements
from periphery_core.model.graph import node_keys
from periphery_core.model.loading import LoadedModel
from periphery_core.progress import CancelToken, ProgressFn, check, report
from periphery_core.runtime.feeds import random_feeds
from periphery_core.runtime.session import SessionConfig, make_session, run_session


def profile_model(
    loaded: LoadedModel,
    analysis: ModelAnalysis,
    *,
    runs: int = 5,
    threads: int = 1,
    feeds: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ModelAnalysis:
    """Return `analysis` with each node's measured seconds (median of `runs` runs), run on
    `feeds` when given, else on seeded random inputs."""
    model = copy.deepcopy(loaded.proto)
    for node, key in zip(model.graph.node, node_keys(model.graph), strict=True):
        node.name = key
    feeds = dict(feeds) if feeds is not None else random_feeds(analysis.inputs)
    with tempfile.TemporaryDirectory(prefix="periphery-profile-") as tmp:
        prefix = str(Path(tmp) / "trace")
        sess = make_session(
            model, SessionConfig(exact=True, threads=threads, profile_prefix=prefix),
            scratch_dir=Path(tmp),
        )
        run_session(sess, feeds)  # warm-up
        for i in range(runs):
            check(cancel)
            report(progress, "profile", i, runs)
            run_session(sess, feeds)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
    report(progress, "profile", runs, runs)
    per_node: dict[str, list[float]] = defaultdict(list)
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        per_node[ev["name"][: -len("_kernel_time")]].append(float(ev.get("dur", 0)) * 1e-6)
    # The first recorded run is the warm-up: drop it where a node has all runs recorded.
    measured = {
        key: statistics.median(vals[1:] if len(vals) > runs else vals)
        for key, vals in per_node.items()
    }
    return with_measurements(analysis, measured)
