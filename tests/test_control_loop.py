"""The control loops of the master and the node sleep until there is work, and wake for it.

A loop that polled with a short timeout (5 ms on the master, 20 ms on a node) woke hundreds of
times a second while idle, taking CPU from the stages sharing the host, and held a command
queued by another thread until its poll timed out. These count the loops' turns while idle and
check that queued work (a command, a retry, a stats message) still runs at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster import master_control, node_control
from periphery_core.cluster import node as node_module
from periphery_core.cluster.master import Master
from periphery_core.cluster.node import NodeConfig, NodeDaemon
from periphery_core.cluster.node_control import ControlChannel
from periphery_core.cluster.waker import Waker
from periphery_core.discovery import NodeAddress
from tests.waiting import wait_for


def test_a_wake_from_another_thread_ends_a_long_poll_and_drain_rearms_it() -> None:
    waker = Waker()
    poller = zmq.Poller()
    poller.register(waker.fd, zmq.POLLIN)
    try:
        assert poller.poll(0) == []  # nothing pending
        timer = threading.Timer(0.05, waker.wake)
        timer.start()
        ready = dict(poller.poll(10_000))  # returns on the wake, not after 10 s
        timer.join()
        assert waker.fd in ready
        for _ in range(3):  # several wakes are one
            waker.wake()
        waker.drain()
        assert poller.poll(0) == []
    finally:
        waker.close()
    waker.wake()  # after close: nothing happens, nothing raises
    waker.close()


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[NodeDaemon]:
    """A node in this process (so its loop can be counted), serving until the test ends."""
    monkeypatch.setattr(node_module, "measure_speed", lambda: 1.0)
    monkeypatch.setattr(node_module, "CALIBRATE_AT_S", ())
    daemon = NodeDaemon(NodeConfig(name="quiet", advertise=False, stats_interval_s=0.25))
    daemon.start()
    serving = threading.Thread(target=daemon.serve_forever, daemon=True)
    serving.start()
    try:
        yield daemon
    finally:
        daemon.halt()
        serving.join(5)
        assert not serving.is_alive(), "halt() did not end the node's control loop"
        daemon.stop()


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[float]:
    """Wrap `owner.name` so that each call appends its time to the list returned."""
    calls: list[float] = []
    original = getattr(owner, name)

    def counted(self: object, *args: object) -> object:
        calls.append(time.monotonic())
        return original(self, *args)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_an_idle_master_and_node_sleep_between_heartbeats_and_stats(
        node: NodeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    node_turns = _count_calls(monkeypatch, ControlChannel, "_send_outbox")
    master_turns = _count_calls(monkeypatch, master_control.Control, "_turn")
    events: list[ev.Event] = []
    with Master(heartbeat_s=0.5) as master:
        master.bus.subscribe(events.append)
        port = int(node.control_endpoint.rsplit(":", 1)[1])
        handle = master.connect(NodeAddress(node_id="x", name="quiet", host="127.0.0.1",
                                            port=port, properties={}, source="static"))
        # Idle for 2 s: 4 heartbeats out (and 4 pongs back), 8 stats in. The old loops took
        # some 400 (master) and 100 (node) turns in that time.
        start = time.monotonic()
        time.sleep(2.0)
        master_n = sum(1 for t in list(master_turns) if start <= t < start + 2.0)
        node_n = sum(1 for t in list(node_turns) if start <= t < start + 2.0)
        assert master_n <= 40, f"the master's control loop turned {master_n} times in 2 s idle"
        assert node_n <= 40, f"the node's control loop turned {node_n} times in 2 s idle"
        # ... and yet what they exchange flows: the stats every 0.25 s, the heartbeats.
        stats = [e for e in events if isinstance(e, ev.NodeStats)]
        assert len(stats) >= 4, f"{len(stats)} stats messages in 2 s (one each 0.25 s)"
        assert not master.nodes[handle.node_id].lost


def test_a_queued_command_and_a_retry_run_at_once_not_at_the_next_heartbeat() -> None:
    with Master(heartbeat_s=30.0) as master:  # no heartbeat to wake the loop
        control = master._control
        time.sleep(0.3)  # the loop is asleep in its poll
        done: list[float] = []
        ran = threading.Event()

        def retried() -> None:
            done.append(time.monotonic())
            ran.set()

        t0 = time.monotonic()
        control.put(lambda: (done.append(time.monotonic()), control.retry(retried)))
        assert ran.wait(5), "the retry never ran"
        # It ran within a poll's sleep (MAX_SLEEP_S), not at the next heartbeat 30 s away,
        # and the retry waited its RETRY_S after the command.
        assert done[0] - t0 < master_control.MAX_SLEEP_S
        assert done[1] - done[0] >= master_control.RETRY_S * 0.9


def test_a_halted_node_stops_serving_within_one_sleep(node: NodeDaemon) -> None:
    wait_for(lambda: node.data is not None, 5, "the node's data path")
    # The fixture's teardown halts it and asserts the loop ended: here, only how fast.
    t0 = time.monotonic()
    node.halt()
    assert node.channel is not None
    deadline = t0 + node_control.SLEEP_S
    while not node.channel.closed and time.monotonic() < deadline + 1.0:
        time.sleep(0.01)
    assert node.channel.closed, "the control loop did not end after halt()"
    assert time.monotonic() - t0 < node_control.SLEEP_S
