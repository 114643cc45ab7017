"""The serving core (`Pipeline`) against real node processes: a redeploy under load, two losses
close together, a cancelled request, and a master that outlives a dead and a hung node.

The CLI and app tests show the same behaviour through the entry points users run; these pin
the core's guarantees one by one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import pytest

from periphery_core.cluster import events as ev
from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.verify import bit_identical
from periphery_core.runtime.chain import LocalChain
from periphery_core.runtime.session import SessionConfig
from tests.test_recovery import LAYERS, WIDTH, _mlp
from tests.waiting import wait_for

OUT = f"h{LAYERS - 1}"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = _mlp(tmp_path_factory.mktemp("serving") / "mlp.onnx")
    loaded = load_model(path)
    analysis = analyze(loaded)
    rng = np.random.default_rng(3)
    pool = [{"x": rng.standard_normal((8, WIDTH)).astype(np.float32)} for _ in range(12)]
    whole = LocalChain([loaded.proto], SessionConfig(exact=True, threads=1))
    expected = [whole.run(f)[OUT] for f in pool]
    return loaded, analysis, pool, expected


def _stream(pipeline: Pipeline, pool: list, total: int, window: int,
            during: Callable[[int], None] = lambda i: None) -> list[np.ndarray]:
    futures: list[Future] = []
    results: list[np.ndarray] = []
    for i in range(total):
        during(i)
        if len(futures) >= window:
            results.append(futures.pop(0).result(timeout=60)[OUT])
        futures.append(pipeline.submit(pool[i % len(pool)]))
    results += [f.result(timeout=60)[OUT] for f in futures]
    return results


def _count_completions(bus: EventBus) -> dict[str, int]:
    counts: dict[str, int] = {}
    bus.subscribe(lambda e: counts.__setitem__(e.request_id, counts.get(e.request_id, 0) + 1)
                  if isinstance(e, ev.RequestCompleted) else None)
    return counts


def test_a_redeploy_while_streaming_loses_nothing(model) -> None:  # type: ignore[no-untyped-def]
    loaded, analysis, pool, expected = model
    with LocalCluster(3) as local, local.master() as master:
        ids = [a.node_id for a in local.addresses]
        pipeline = Pipeline(master, loaded, analysis, k=2)
        try:
            pipeline.deploy(ids[:2])
            counts = _count_completions(master.bus)
            redeployed = threading.Event()

            def redeploy() -> None:  # from another thread, as the app's Shards screen does
                pipeline.deploy([ids[2], ids[0]])
                redeployed.set()

            worker = threading.Thread(target=redeploy)
            results = _stream(pipeline, pool, 400, 16,
                              lambda i: worker.start() if i == 100 else None)
            worker.join(60)
            assert redeployed.is_set() and pipeline.assignment == (ids[2], ids[0])
            assert pipeline.failed is None
        finally:
            pipeline.close()
    assert len(counts) == 400 and set(counts.values()) == {1}
    for i, got in enumerate(results):
        assert bit_identical(expected[i % len(pool)], got), f"request {i}"


def test_two_nodes_lost_close_together_recover_once_onto_the_survivor(model) -> None:  # type: ignore[no-untyped-def]
    loaded, analysis, pool, expected = model
    with LocalCluster(3) as local, local.master() as master:
        ids = [a.node_id for a in local.addresses]
        pipeline = Pipeline(master, loaded, analysis, k=3)
        started: list[ev.RecoveryStarted] = []
        master.bus.subscribe(lambda e: started.append(e)
                             if isinstance(e, ev.RecoveryStarted) else None)
        deploys: list[ev.DeployStarted] = []
        master.bus.subscribe(lambda e: deploys.append(e)
                             if isinstance(e, ev.DeployStarted) else None)
        try:
            pipeline.deploy(ids)

            def kill_two(i: int) -> None:
                if i == 80:
                    local.kill(0)
                    time.sleep(0.5)
                    local.kill(2)

            results = _stream(pipeline, pool, 300, 8, kill_two)
            assert pipeline.failed is None
            assert len(pipeline.recoveries) == 1, pipeline.recoveries
            assert pipeline.assignment == (ids[1],)
            assert len(started) == 1
            assert len(deploys) == 2  # the first deploy and one recovery, nothing racing
        finally:
            pipeline.close()
    for i, got in enumerate(results):
        assert bit_identical(expected[i % len(pool)], got), f"request {i}"


def test_a_cancelled_request_does_not_stop_later_results(model) -> None:  # type: ignore[no-untyped-def]
    loaded, analysis, pool, expected = model
    with LocalCluster(2) as local, local.master() as master:
        pipeline = Pipeline(master, loaded, analysis, k=2)
        try:
            pipeline.deploy([a.node_id for a in local.addresses])
            futures = [pipeline.submit(pool[i % len(pool)]) for i in range(40)]
            cancelled = [f for f in futures[::3] if f.cancel()]
            assert cancelled, "no request was still pending to cancel"
            for i, f in enumerate(futures):
                if f not in cancelled:
                    assert bit_identical(expected[i % len(pool)], f.result(timeout=30)[OUT])
            # the results thread lives on: a new request still completes
            assert bit_identical(expected[0], pipeline.submit(pool[0]).result(timeout=30)[OUT])
        finally:
            pipeline.close()


def test_the_master_outlives_a_dead_node_and_a_hung_one(model) -> None:  # type: ignore[no-untyped-def]
    """For 125 s after one node is SIGKILLed and another SIGSTOPped (long enough to fill any
    send queue to them), the master keeps heartbeating, reporting and deploying."""
    loaded, analysis, pool, expected = model
    with LocalCluster(3) as local, local.master() as master:
        ids = [a.node_id for a in local.addresses]
        stats: list[float] = []
        master.bus.subscribe(lambda e: stats.append(e.t) if isinstance(e, ev.NodeStats)
                             and e.node_id == ids[0] else None)
        pipeline = Pipeline(master, loaded, analysis, k=1, recover=False)
        hung = local.nodes[2].process.pid
        try:
            pipeline.deploy([ids[0]])
            local.kill(1)
            os.kill(hung, signal.SIGSTOP)
            wait_for(lambda: master.nodes[ids[1]].lost and master.nodes[ids[2]].lost, 15,
                  "both nodes to be declared lost")
            t_end = time.time() + 125
            next_deploy, deploys = time.time() + 25, 0
            while time.time() < t_end:
                got = pipeline.submit(pool[1]).result(timeout=30)[OUT]
                assert bit_identical(expected[1], got)
                if time.time() > next_deploy:  # deploy again every 40 s
                    pipeline.deploy([ids[0]])
                    next_deploy, deploys = time.time() + 40, deploys + 1
                time.sleep(0.2)
            assert master.failure is None
            assert all(t.is_alive() for t in master._threads)
            assert not master.nodes[ids[0]].lost  # heartbeats kept flowing to the live node
            assert stats and stats[-1] > time.time() - 5  # and its stats still arrive
            assert deploys >= 2
        finally:
            pipeline.close()
            os.kill(hung, signal.SIGCONT)
