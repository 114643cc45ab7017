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
from collections.abc import Iterator

import pytest

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.errors import ClusterError
from periphery_core.partition.verify import bit_identical
from tests.streaming import OUT, Workload, count_completions, mlp_workload, stream
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    return mlp_workload(tmp_path_factory.mktemp("serving"), seed=3, inputs=12)


def test_a_redeploy_while_streaming_loses_nothing(work: Workload) -> None:
    with LocalCluster(3) as local, local.master() as master:
        ids = [a.node_id for a in local.addresses]
        pipeline = Pipeline(master, work.loaded, work.analysis, k=2, exact=True)
        try:
            pipeline.deploy(ids[:2])
            counts = count_completions(master.bus)
            redeployed = threading.Event()

            def redeploy() -> None:  # from another thread, as the app's Shards screen does
                pipeline.deploy([ids[2], ids[0]])
                redeployed.set()

            worker = threading.Thread(target=redeploy)
            results = stream(pipeline, work.pool, 400, 16,
                             lambda i: worker.start() if i == 100 else None)
            worker.join(60)
            assert redeployed.is_set() and pipeline.assignment == (ids[2], ids[0])
            assert pipeline.failed is None
        finally:
            pipeline.close()
    assert len(counts) == 400 and set(counts.values()) == {1}
    work.assert_matches(results)


def test_two_nodes_lost_close_together_recover_once_onto_the_survivor(work: Workload) -> None:
    with LocalCluster(3) as local, local.master() as master:
        ids = [a.node_id for a in local.addresses]
        pipeline = Pipeline(master, work.loaded, work.analysis, k=3, exact=True)
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
                    # a fixed gap on purpose: the scenario is two losses a moment apart, not
                    # at once, both before the master declares the first (half a second after
                    # its connection closed)
                    time.sleep(0.2)
                    local.kill(2)

            results = stream(pipeline, work.pool, 300, 8, kill_two)
            assert pipeline.failed is None
            assert len(pipeline.recoveries) == 1, pipeline.recoveries
            assert pipeline.assignment == (ids[1],)
            assert len(started) == 1
            assert len(deploys) == 2  # the first deploy and one recovery, nothing racing
        finally:
            pipeline.close()
    work.assert_matches(results)


def test_a_cancelled_request_does_not_stop_later_results(work: Workload) -> None:
    with LocalCluster(2) as local, local.master() as master:
        pipeline = Pipeline(master, work.loaded, work.analysis, k=2, exact=True)
        try:
            pipeline.deploy([a.node_id for a in local.addresses])
            futures = [pipeline.submit(work.pool[i % len(work.pool)]) for i in range(40)]
            cancelled = [f for f in futures[::3] if f.cancel()]
            assert cancelled, "no request was still pending to cancel"
            for i, f in enumerate(futures):
                if f not in cancelled:
                    got = f.result(timeout=30)[OUT]
                    assert bit_identical(work.expected[i % len(work.pool)], got)
            # the results thread lives on: a new request still completes
            got = pipeline.submit(work.pool[0]).result(timeout=30)[OUT]
            assert bit_identical(work.expected[0], got)
        finally:
            pipeline.close()


def test_the_master_outlives_a_dead_node_and_a_hung_one(work: Workload) -> None:
    """For 10 s after one node is SIGKILLed and another SIGSTOPped, the master keeps
    heartbeating, reporting and deploying. It heartbeats every 0.1 s, so its queue to the dead
    node (64 messages) is full within 7 s and stays full for the rest: a master that blocked
    on a full queue would stop here."""
    with LocalCluster(3) as local, local.master(heartbeat_s=0.1) as master:
        ids = [a.node_id for a in local.addresses]
        stats: list[float] = []
        master.bus.subscribe(lambda e: stats.append(e.t) if isinstance(e, ev.NodeStats)
                             and e.node_id == ids[0] else None)
        pipeline = Pipeline(master, work.loaded, work.analysis, k=1, recover=False, exact=True)
        hung = local.nodes[2].process.pid
        try:
            pipeline.deploy([ids[0]])
            local.kill(1)
            os.kill(hung, signal.SIGSTOP)
            wait_for(lambda: master.nodes[ids[1]].lost and master.nodes[ids[2]].lost, 15,
                  "both nodes to be declared lost")
            t_end = time.time() + 10
            next_deploy, deploys = time.time() + 3, 0
            while time.time() < t_end:
                got = pipeline.submit(work.pool[1]).result(timeout=30)[OUT]
                assert bit_identical(work.expected[1], got)
                if time.time() > next_deploy:  # deploy again every 3 s
                    pipeline.deploy([ids[0]])
                    next_deploy, deploys = time.time() + 3, deploys + 1
                time.sleep(0.2)  # pacing the 10 s of requests, not waiting for anything
            assert master.failure is None
            assert all(t.is_alive() for t in master._threads)
            assert not master.nodes[ids[0]].lost  # heartbeats kept flowing to the live node
            assert stats and stats[-1] > time.time() - 5  # and its stats still arrive
            assert deploys >= 2
        finally:
            pipeline.close()
            os.kill(hung, signal.SIGCONT)


def test_a_deploy_onto_a_node_lost_before_its_stage_goes_out_fails_with_the_loss(
        work: Workload) -> None:
    """The node is connected when the deploy begins and lost (SIGSTOPped, hung) before its
    stage is made: the deploy fails naming the loss, not after its whole timeout (the app's
    redeploy onto a hung node waited 120 s for a node already declared lost)."""
    with LocalCluster(1) as local, local.master() as master:
        node_id = local.addresses[0].node_id
        hung = local.nodes[0].process.pid
        shard = work.loaded.proto.SerializeToString()

        def shards() -> Iterator[bytes]:  # made as the deploy asks for them, as iter_shards does
            wait_for(lambda: master.nodes[node_id].lost, 15, "the hung node to be lost")
            yield shard

        os.kill(hung, signal.SIGSTOP)
        try:
            with pytest.raises(ClusterError, match="was lost"):
                master.deploy(shards(), [node_id], timeout=60)
        finally:
            os.kill(hung, signal.SIGCONT)


def test_a_node_hung_as_its_stage_goes_out_is_lost_without_waiting_out_the_build_grace(
        work: Workload) -> None:
    """A stopped process's socket buffers take a small stage whole, so every chunk and the end
    "go out": only the node's own "building" earns it the 30 s a node building its session
    may stay silent. Hung, it is lost after the usual silence and the deploy fails so."""
    with LocalCluster(1) as local, local.master() as master:
        node_id = local.addresses[0].node_id
        hung = local.nodes[0].process.pid
        os.kill(hung, signal.SIGSTOP)
        try:
            with pytest.raises(ClusterError, match="was lost"):
                master.deploy([work.loaded.proto.SerializeToString()], [node_id], timeout=20)
        finally:
            os.kill(hung, signal.SIGCONT)
