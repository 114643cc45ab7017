"""Discovery with real zeroconf, bound to loopback only, and static peers.

Every zeroconf instance here is restricted to ``127.0.0.1``: nothing is advertised or browsed
on the machine's real interfaces. Fixtures stop everything they start, and an autouse fixture
fails a test that leaves a thread behind.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from zeroconf import ServiceInfo, Zeroconf

from periphery_core.discovery import SERVICE_TYPE, DiscoveryError, NodeAddress
from periphery_core.discovery.combined import Combined, discovery_for
from periphery_core.discovery.mdns_advertiser import MdnsAdvertiser, instance_label
from periphery_core.discovery.mdns_browser import MdnsBrowser, decode_txt
from periphery_core.discovery.static import StaticPeers, parse_peer
from periphery_core.errors import PeripheryError
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ["127.0.0.1"]
# Loopback discovery takes ~1.2-2 s; generous bounds keep a loaded CI machine from flaking.
WAIT = 10.0


def new_id() -> str:
    """A node id unique to this run: other test runs on this machine share the loopback."""
    return uuid.uuid4().hex


def ours(nodes: list[NodeAddress], *ids: str) -> list[NodeAddress]:
    """The nodes this test advertised, ignoring any another process advertises on loopback."""
    return [n for n in nodes if n.node_id in ids]


class Recorder:
    """Collects `on_change` calls from the browser's worker thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, NodeAddress]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: str, address: NodeAddress) -> None:
        with self._lock:
            self.events.append((kind, address))
            self.threads.add(threading.current_thread().name)

    def wait_for(self, kind: str, match: Callable[[NodeAddress], bool]) -> NodeAddress:
        """The first `kind` event whose address matches, waiting up to WAIT for it."""
        def seen() -> NodeAddress | None:
            with self._lock:
                return next((a for k, a in self.events if k == kind and match(a)), None)

        return wait_for(seen, WAIT, lambda: f"a matching {kind!r} event: {self.events}")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield

    def left() -> list[str]:
        return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]

    wait_for(lambda: not left(), 5, lambda: f"the test's threads to end: {left()} still run")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def browser(recorder: Recorder) -> Iterator[MdnsBrowser]:
    found = MdnsBrowser(interfaces=LOOPBACK, on_change=recorder)
    found.start()
    yield found
    found.stop()


@pytest.fixture
def advertise() -> Iterator[Callable[..., MdnsAdvertiser]]:
    started: list[MdnsAdvertiser] = []

    def make(node_id: str, name: str = "box", port: int = 5555, **props: str) -> MdnsAdvertiser:
        advertiser = MdnsAdvertiser(
            node_id=node_id,
            name=name,
            port=port,
            host="127.0.0.1",
            properties={"name": name, **props},
            interfaces=LOOPBACK,
        )
        started.append(advertiser)
        advertiser.start()
        return advertiser

    yield make
    for advertiser in started:
        advertiser.stop()


ADVERTISER_SCRIPT = textwrap.dedent(
    """
    import sys
    from periphery_core.discovery.mdns_advertiser import MdnsAdvertiser

    advertiser = MdnsAdvertiser(
        node_id=sys.argv[1], name="child", port=6123, host="127.0.0.1",
        properties={"name": "child", "proto": "1", "device": "cpu", "memory": "1024"},
        interfaces=["127.0.0.1"],
    )
    advertiser.start()
    print("ready", flush=True)
    sys.stdin.readline()
    advertiser.stop()
    print("stopped", flush=True)
    """
)


def test_advertiser_in_another_process_is_found_then_removed(
    browser: MdnsBrowser, recorder: Recorder
) -> None:
    node_id = new_id()
    child = subprocess.Popen(
        [sys.executable, "-c", ADVERTISER_SCRIPT, node_id],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"

        node = recorder.wait_for("added", lambda a: a.node_id == node_id)
        assert node.port == 6123
        assert node.host == "127.0.0.1"
        assert node.name == "child"
        assert node.source == "mdns"
        assert dict(node.properties) == {
            "id": node_id,
            "name": "child",
            "proto": "1",
            "device": "cpu",
            "memory": "1024",
        }
        assert ours(browser.nodes(), node_id) == [node]

        child.stdin.close()  # the child stops its advertiser: goodbye packets
        assert child.stdout.readline().strip() == "stopped"
        gone = recorder.wait_for("removed", lambda a: a.node_id == node_id)
        assert gone.port == 6123
        assert ours(browser.nodes(), node_id) == []
        assert child.wait(timeout=WAIT) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # Callbacks came from the browser's own worker thread, not zeroconf's.
    assert recorder.threads == {"mdns-browser"}


def test_same_name_different_ids_are_both_seen(
    browser: MdnsBrowser, recorder: Recorder, advertise: Callable[..., MdnsAdvertiser]
) -> None:
    id_a, id_b = sorted([new_id(), new_id()])
    first = advertise(id_a, name="twin", port=7001)
    second = advertise(id_b, name="twin", port=7002)
    assert first.service_name != second.service_name

    recorder.wait_for("added", lambda a: a.node_id == id_a)
    recorder.wait_for("added", lambda a: a.node_id == id_b)

    assert [(n.node_id, n.name, n.port) for n in ours(browser.nodes(), id_a, id_b)] == [
        (id_a, "twin", 7001),
        (id_b, "twin", 7002),
    ]


def test_start_returns_before_registration(advertise: Callable[..., MdnsAdvertiser]) -> None:
    advertiser = advertise(new_id())

    # Probing takes ~1.6 s, so a start() that registered inline would have set this already.
    assert not advertiser.registered.is_set()
    assert advertiser.registered.wait(WAIT)
    assert not advertiser.failed.is_set()


def test_update_is_reported(
    browser: MdnsBrowser, recorder: Recorder, advertise: Callable[..., MdnsAdvertiser]
) -> None:
    node_id = new_id()
    advertiser = advertise(node_id, free_memory="100")
    recorder.wait_for("added", lambda a: a.node_id == node_id)
    assert advertiser.registered.wait(WAIT)

    advertiser.update({"name": "box", "free_memory": "42"})

    updated = recorder.wait_for(
        "updated", lambda a: a.node_id == node_id and a.properties.get("free_memory") == "42"
    )
    assert updated.port == 5555
    assert [n.properties["free_memory"] for n in ours(browser.nodes(), node_id)] == ["42"]


def test_stop_is_idempotent_and_stops_a_registration_in_progress() -> None:
    advertiser = MdnsAdvertiser(
        node_id=new_id(),
        name="box",
        port=5555,
        host="127.0.0.1",
        properties={},
        interfaces=LOOPBACK,
    )
    advertiser.start()
    advertiser.stop()  # while still probing: cancelled, never registered
    advertiser.stop()
    assert not advertiser.registered.is_set()

    browser = MdnsBrowser(interfaces=LOOPBACK)
    browser.start()
    browser.stop()
    browser.stop()


@pytest.fixture
def raw_zeroconf() -> Iterator[Zeroconf]:
    zc = Zeroconf(interfaces=LOOPBACK)
    yield zc
    zc.close()


def test_malformed_txt_does_not_crash_the_browser(
    browser: MdnsBrowser,
    recorder: Recorder,
    raw_zeroconf: Zeroconf,
    advertise: Callable[..., MdnsAdvertiser],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="periphery_core.discovery.mdns_browser")
    evil_id, good_id = new_id(), new_id()
    evil = f"evil-{evil_id[:8]}"
    hostile = ServiceInfo(
        SERVICE_TYPE,
        f"{evil}.{SERVICE_TYPE}",
        port=6666,
        properties={b"id": evil_id.encode(), b"name": b"\xff\xfe not utf-8"},
        server=f"{evil}.local.",
        addresses=[bytes([127, 0, 0, 1])],
    )
    raw_zeroconf.register_service(hostile)  # blocks while probing; a real peer in this process
    advertise(good_id, name="good")

    recorder.wait_for("added", lambda a: a.node_id == good_id)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if evil in r.getMessage()]

    # The hostile record was processed (and warned about), not merely not seen yet: only
    # then does its absence below say anything.
    wait_for(warnings, WAIT, "the browser to warn about the malformed record")
    assert [n.node_id for n in ours(browser.nodes(), good_id, evil_id)] == [good_id]
    assert not [e for e in recorder.events if e[1].node_id == evil_id]
    assert len(warnings()) == 1
    assert "not UTF-8" in warnings()[0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, {}),
        ({b"id": b"n1", b"cores": b"8"}, {"id": "n1", "cores": "8"}),
        ({b"flag": None, b"empty": b""}, {"flag": "", "empty": ""}),
        ({"naïve".encode(): "ü".encode()}, {"naïve": "ü"}),
    ],
)
def test_decode_txt(raw: dict[bytes, bytes | None], expected: dict[str, str]) -> None:
    assert decode_txt(raw) == expected


@pytest.mark.parametrize("raw", [{b"name": b"\xff"}, {b"\xc3": b"x"}, {b"": b"x"}])
def test_decode_txt_rejects_malformed(raw: dict[bytes, bytes | None]) -> None:
    with pytest.raises(ValueError):
        decode_txt(raw)


def test_instance_label_fits_a_dns_label() -> None:
    assert instance_label("box", "0123456789abcdef") == "box-01234567"
    assert instance_label("box.lan", "ab.cd") == "box-lan-ab-cd"
    long = instance_label("é" * 100, "0123456789")
    assert long.endswith("-01234567")
    assert len(long.encode("utf-8")) <= 63


@pytest.mark.parametrize(
    ("host", "port"), [("localhost", 0), ("localhost", 70000), ("not-an-ip", 5555)]
)
def test_advertiser_rejects_bad_host_or_port(host: str, port: int) -> None:
    with pytest.raises(DiscoveryError):
        MdnsAdvertiser(node_id="x", name="x", port=port, host=host, properties={})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10.0.0.2:5555", ("10.0.0.2", 5555)),
        ("localhost:5555", ("localhost", 5555)),
        ("node-3.lan:1", ("node-3.lan", 1)),
        ("[::1]:5555", ("::1", 5555)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
        ("  127.0.0.1:6000 ", ("127.0.0.1", 6000)),
    ],
)
def test_parse_peer(spec: str, expected: tuple[str, int]) -> None:
    assert parse_peer(spec) == expected


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("localhost", "port is missing"),
        ("localhost:", "port is missing"),
        ("localhost:0", "not in 1..65535"),
        ("localhost:70000", "not in 1..65535"),
        ("localhost:http", "not a number"),
        ("localhost:-1", "not a number"),
        (":5555", "host is empty"),
        ("", "port is missing"),
        ("::1:5555", "in brackets"),
        ("[::1]", "is not HOST:PORT"),
        ("[not-v6]:5555", "not an IPv6 address"),
        ("bad host:5555", "not a host name"),
    ],
)
def test_parse_peer_rejects(spec: str, reason: str) -> None:
    with pytest.raises(DiscoveryError) as caught:
        parse_peer(spec)
    message = str(caught.value)
    assert message.startswith(f"peer {spec!r} is not HOST:PORT")
    assert reason in message
    assert "\n" not in message
    assert isinstance(caught.value, PeripheryError)
    assert caught.value.title == "Discovery"


def test_static_peers_nodes() -> None:
    peers = StaticPeers(["10.0.0.2:5555", "[::1]:6000", "10.0.0.2:5555", "box:7000"])
    peers.start()

    assert peers.nodes() == [
        NodeAddress("10.0.0.2:5555", "10.0.0.2:5555", "10.0.0.2", 5555, {}, "static"),
        NodeAddress("[::1]:6000", "[::1]:6000", "::1", 6000, {}, "static"),
        NodeAddress("box:7000", "box:7000", "box", 7000, {}, "static"),
    ]
    # Every static peer is known from the outset: waiting for more returns them at once.
    assert peers.wait_for(10, timeout=3600) == peers.nodes()
    assert peers.wait_for(None, timeout=3600) == peers.nodes()
    peers.stop()


def test_peers_and_mdns_together_return_once_the_wanted_nodes_are_known(
    advertise: Callable[..., MdnsAdvertiser],
) -> None:
    advertise(new_id(), name="wanted")
    found = discovery_for(["10.0.0.2:5555"], mdns=True, interfaces=LOOPBACK)
    found.start()
    try:
        t0 = time.monotonic()
        nodes = found.wait_for(2, timeout=60)
        waited = time.monotonic() - t0
    finally:
        found.stop()
    assert nodes[0].source == "static"
    assert len(nodes) >= 2 and {n.source for n in nodes[1:]} == {"mdns"}
    assert waited < 60, "it waited out its timeout instead of returning on the second node"


def test_stopping_the_browser_ends_a_wait_for_whatever_turns_up() -> None:
    browser = MdnsBrowser(interfaces=LOOPBACK)
    browser.start()
    returned = threading.Event()

    def wait() -> None:
        browser.wait_for(None, timeout=3600)
        returned.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    browser.stop()
    waiter.join(timeout=WAIT)
    assert returned.is_set(), "wait_for(None) outlived the browser it waited on"


def test_static_peers_validate_every_spec_up_front() -> None:
    with pytest.raises(DiscoveryError, match="'oops'"):
        StaticPeers(["10.0.0.2:5555", "oops"])


def test_node_address_is_frozen() -> None:
    node = NodeAddress("a", "a", "127.0.0.1", 1, {}, "static")
    with pytest.raises(FrozenInstanceError):
        node.port = 2  # type: ignore[misc]


def test_a_peer_that_mdns_also_finds_is_listed_once(
    advertise: Callable[..., MdnsAdvertiser],
) -> None:
    """`--peer 127.0.0.1:7031` plus mDNS, which finds the same node: one entry, the peer's
    (two would make a command connect to it twice and count it as two nodes)."""
    node_id = new_id()
    advertise(node_id, name="both", port=7031)
    browser = MdnsBrowser(interfaces=LOOPBACK)
    found = Combined([StaticPeers(["127.0.0.1:7031", "127.0.0.1:7032"]), browser])
    found.start()
    try:
        wait_for(lambda: ours(browser.nodes(), node_id), WAIT, "mDNS to find the node")
        ports = [(n.host, n.port) for n in found.nodes() if n.port in (7031, 7032)]
        assert ports == [("127.0.0.1", 7031), ("127.0.0.1", 7032)]
        assert [n.source for n in found.nodes() if n.port == 7031] == ["static"]
    finally:
        found.stop()
