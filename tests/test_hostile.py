"""Hostile peers: a node and a master each reject what does not fit the protocol and carry on.

Against a live node process: a tensor with one empty dim and huge others, control fields of
the wrong type or range, and a huge declared shard size are each refused, and the node keeps
computing. Against a master: a fake node that answers with thousands of malformed messages
leaves every master thread alive, the real node beside it heartbeating, and memory bounded.
Real processes and sockets throughout; every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.node import NodeConfig, NodeDaemon
from periphery_core.cluster.node_data import NodeDataPath
from periphery_core.cluster.shard_load import ACK_BYTES
from periphery_core.discovery import NodeAddress
from periphery_core.errors import ClusterError
from periphery_core.runtime.chain import LocalChain
from periphery_core.runtime.session import SessionConfig
from periphery_core.wire import KINDS, PROTOCOL_VERSION, Message, WireError, decode, encode
from tests.models import mlp
from tests.waiting import wait_for

MODEL = mlp(width=32, layers=3, batch=1)
SHARD = MODEL.SerializeToString()
MIB = 1 << 20


# ---------------------------------------------------------------------------- the schema


SHA = "ab" * 32
VALID: dict[str, dict[str, Any]] = {  # one valid header per kind, every optional field set
    "hello": {"master": "tcp://127.0.0.1:5555"},
    "info": {"node": "n1", "name": "n", "device": "cpu", "data": "tcp://[::1]:6000", "cores": 4,
             "memory": 1 << 33, "free": 1 << 32, "speed": 1.5, "key": "", "stage": -1,
             "sha256": "", "exact": True, "master_silent_s": 0.5},
    "ping": {"t": 1.0},
    "pong": {"t": 1},
    "deploy_begin": {"stage": 0, "stages": 1, "sha256": SHA, "size": 10, "inputs": ["x"],
                     "outputs": ["y"], "next": "tcp://h:1", "results": "tcp://h:2",
                     "exact": False, "epoch": 3, "next_key": "k", "results_key": "k",
                     "reuse": False, "head": 10},
    "deploy_chunk": {"offset": 0},
    "deploy_end": {"sha256": SHA},
    "received": {"stage": 0, "bytes": 1 << 20},
    "building": {"stage": 0},
    "ready": {"stage": 0, "provider": "CPUExecutionProvider"},
    "error": {"reason": "no", "stage": -1},
    "stats": {"node": "n1", "cpu": 150.0, "rss": 1, "mem": 50, "rejected": 0, "speed": 2,
              "kv": 1 << 20, "seqs": 2},
    "shutdown": {},
    "release": {"seqs": [1, 2]},
    "activation": {"id": 1, "times": [[0, 1.0, 2.0, 3.0, 4.0, 2304]], "epoch": 0, "seq": 7,
                   "pos": 12, "new": 1},
    "result": {"id": 1, "times": [], "epoch": 2, "seq": 7, "pos": 0, "new": 16},
    "failure": {"id": 1, "reason": "r", "stage": -1, "epoch": 0},
}
WRONG_TYPE = {"int": "1", "number": "1.0", "str": 1, "bool": 1, "list": "[]"}


def _frames(kind: str, fields: dict[str, Any]) -> list[bytes]:
    return [msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, **fields})]


def test_every_kind_has_a_valid_example_that_decodes() -> None:
    assert set(VALID) == set(KINDS)
    for kind, fields in VALID.items():
        assert decode(_frames(kind, fields)).fields == fields


@pytest.mark.parametrize("kind,key", [(k, f) for k, spec in KINDS.items() for f in spec])
def test_every_field_rejects_a_wrong_type_and_a_required_one_its_absence(kind: str,
                                                                          key: str) -> None:
    spec = KINDS[kind][key]
    with pytest.raises(WireError, match=f"'{key}'"):
        decode(_frames(kind, {**VALID[kind], key: WRONG_TYPE[spec.type]}))
    if spec.required:
        with pytest.raises(WireError, match=f"needs field '{key}'"):
            decode(_frames(kind, {k: v for k, v in VALID[kind].items() if k != key}))


@pytest.mark.parametrize("kind,key,value", [
    ("info", "free", "lots"), ("info", "cores", 0), ("info", "memory", -1),
    ("info", "speed", float("nan")), ("info", "speed", float("inf")), ("info", "speed", 1e300),
    ("info", "data", "tcp://nonsense"), ("info", "data", "ipc:///tmp/x"),
    ("info", "sha256", "x" * 64), ("stats", "cpu", -1.0), ("stats", "mem", 101),
    ("stats", "rss", 2**64 - 1), ("stats", "cpu", True), ("deploy_begin", "epoch", "nan"),
    ("deploy_begin", "epoch", -1), ("deploy_begin", "size", -5), ("deploy_begin", "stage", 2**40),
    ("deploy_begin", "sha256", "AB" * 32), ("deploy_begin", "next", "tcp://a b:5"),
    ("deploy_begin", "inputs", [1]), ("activation", "times", [[0, "t"]]),
    ("activation", "times", [[0.0] * 9]), ("activation", "id", 2**63), ("ping", "t", None),
])
def test_values_out_of_range_are_rejected(kind: str, key: str, value: Any) -> None:
    with pytest.raises(WireError, match=f"'{key}'"):
        decode(_frames(kind, {**VALID[kind], key: value}))


@pytest.mark.parametrize("shape", [[0, 2**39, 2**39], [2**30, 0, 2**30], [0] * 17, [1, -1],
                                   [1.0], [True], ["3"], [None], [2**40]])
def test_bad_shapes_are_wire_errors_never_numpy_errors(shape: list[Any]) -> None:
    header = _frames("activation", {"id": 1, "times": [], "tensors": [["x", "int8", shape]]})
    with pytest.raises(WireError):
        decode([*header, b""])


def test_an_empty_tensor_with_modest_dims_still_decodes() -> None:
    got = decode(encode("activation", {"id": 1, "times": []}, {"x": np.zeros((0, 3, 4), "f4")}))
    assert got.tensors["x"].shape == (0, 3, 4)


# ---------------------------------------------------------------------------- a live node


class LiveNode:
    """One secure node process with the mlp deployed, a master, and raw trusted sockets."""

    def __init__(self, local: LocalCluster, master: Master, log: Path) -> None:
        self.local, self.master, self.log = local, master, log
        self.handle = master.nodes[local.addresses[0].node_id]
        self.chain = LocalChain([MODEL], SessionConfig(exact=True, threads=1))
        self.ctx = zmq.Context()

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.local.nodes[0].process.pid)

    def socket(self, kind: int, data: bool = False) -> zmq.Socket:
        """A raw socket holding the master's keys (a trusted party), connected to the node."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        ring = self.local.master_keys
        assert ring is not None and self.handle.key is not None
        sock.curve_secretkey, sock.curve_publickey = ring.secret, ring.public
        sock.curve_serverkey = self.handle.key
        a = self.handle.address
        sock.connect(self.handle.data_endpoint if data else f"tcp://{a.host}:{a.port}")
        return sock

    def logged(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    def computes(self, seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal((1, 32)).astype(np.float32)
        got = self.master.submit({"x": x}).result(timeout=30)
        np.testing.assert_array_equal(got["y"], self.chain.run({"x": x})["y"])
        assert self.local.nodes[0].process.poll() is None


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    logs = tmp_path_factory.mktemp("node-logs")
    with LocalCluster(1, log_dir=logs) as local, local.master() as master:
        live = LiveNode(local, master, logs / "node0.log")
        master.deploy([SHARD], [live.handle.node_id], exact=True)
        live.computes(0)
        try:
            yield live
        finally:
            live.ctx.destroy(linger=0)


def _ask(sock: zmq.Socket, frames: list[Any]) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(10_000), "the node did not answer"
    return decode(sock.recv_multipart())


def _deploy_begin(live: LiveNode, **fields: Any) -> list[Any]:
    assert live.local.master_keys is not None
    key = live.local.master_keys.public.decode()
    return encode("deploy_begin", {
        "stage": 0, "stages": 1, "sha256": "0" * 64, "size": len(SHARD), "inputs": [],
        "outputs": [], "next": "tcp://127.0.0.1:9", "results": "tcp://127.0.0.1:9",
        "exact": True, "epoch": 7, "next_key": key, "results_key": key, "reuse": False,
        **fields})


def test_a_tensor_with_an_empty_dim_and_huge_others_is_rejected_and_the_node_computes_on(
        node: LiveNode) -> None:
    # One dim 0 makes 0 bytes, so no size limit tripped, yet numpy cannot make the array.
    header = msgpack.packb({"v": PROTOCOL_VERSION, "kind": "activation", "id": 10**6, "times": [],
                            "tensors": [["x", "float32", [0, 2**39, 2**39]]]})
    data = node.socket(zmq.PUSH, data=True)
    control = node.socket(zmq.DEALER)
    try:
        data.send_multipart([header, b""])
        wait_for(lambda: node.logged("rejected data message: tensor 'x' declares"), 20,
                 "the node to log the rejected data frame")
        reply = _ask(control, [header, b""])  # on the control socket (it exited on this)
        assert reply.kind == "error" and "over the limit" in reply.fields["reason"]
    finally:
        data.close()
        control.close()
    node.computes(1)  # the receive thread is alive: a valid request goes through
    node.computes(2)


def test_shared_memory_a_peer_may_not_name_is_rejected_and_the_node_computes_on(
        node: LiveNode, tmp_path: Path) -> None:
    """A trusted peer over TCP cannot have the node read memory of its host, and a process of
    the host cannot pass a file it opened (a key, say) off as a slot (wire/shm.py)."""
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"\x01" * 4096)
    fd = os.open(secret, os.O_RDONLY)
    pid = node.local.nodes[0].process.pid
    far = node.socket(zmq.PUSH, data=True)
    near = node.ctx.socket(zmq.PUSH)
    near.setsockopt(zmq.LINGER, 0)
    assert node.handle.data_ipc, "the node should take data over a private socket too"
    near.connect(node.handle.data_ipc)

    def naming(desc: list[int]) -> bytes:
        return msgpack.packb({"v": PROTOCOL_VERSION, "kind": "activation",
                              "id": 10**6 + desc[1], "times": [], "shm": desc,
                              "tensors": [["x", "float32", [1, 32]]]})

    try:
        far.send(naming([pid, 3, 1]))
        wait_for(lambda: node.logged("rejected data message: shared-memory tensors are taken "
                                     "only over this host's private socket"), 20,
                 "the node to refuse a slot named over TCP")
        near.send(naming([os.getpid(), fd, os.fstat(fd).st_ino]))
        wait_for(lambda: node.logged("rejected data message: the shared-memory slot named is "
                                     "not one of Periphery's"), 20,
                 "the node to refuse a file passed off as a slot")
    finally:
        far.close()
        near.close()
        os.close(fd)
    node.computes(3)


def test_control_fields_of_a_wrong_type_are_rejected_and_the_node_keeps_working(
        node: LiveNode) -> None:
    sha = hashlib.sha256(SHARD).hexdigest()
    control = node.socket(zmq.DEALER)
    try:
        # A master reusing the shard the node holds (this made the node exit).
        reply = _ask(control, _deploy_begin(node, sha256=sha, epoch="not-a-number", reuse=True))
        assert reply.kind == "error" and "'epoch'" in reply.fields["reason"]
        # A fresh upload: refused at once (this killed the build thread; the master timed out).
        t0 = time.monotonic()
        reply = _ask(control, _deploy_begin(node, epoch="not-a-number"))
        assert reply.kind == "error" and "'epoch'" in reply.fields["reason"]
        assert time.monotonic() - t0 < 10
        reply = _ask(control, encode("deploy_chunk", {"offset": 0}, payload=SHARD[:100]))
        assert reply.kind == "error" and "without an upload" in reply.fields["reason"]
        for frames, field in [
            (_frames("ping", {"t": "soon"}), "'t'"),
            (_frames("hello", {"master": 5}), "'master'"),
            (_frames("deploy_chunk", {"offset": -1}), "'offset'"),
            (_frames("deploy_end", {"sha256": "not hex"}), "'sha256'"),
            (_deploy_begin(node, size="2 GiB"), "'size'"),
            (_deploy_begin(node, stage=3, stages=2), "stage 3 of 2"),
            (_deploy_begin(node, next="tcp://nowhere"), "'next'"),
        ]:
            reply = _ask(control, frames)
            assert reply.kind == "error" and field in reply.fields["reason"], reply.fields
        assert _ask(control, encode("ping", {"t": 1.0})).kind == "pong"
    finally:
        control.close()
    node.computes(3)  # the deployed stage is untouched


def test_a_huge_declared_shard_allocates_nothing_before_its_bytes_arrive(node: LiveNode) -> None:
    proc = node.process
    control = node.socket(zmq.DEALER)

    def settled() -> list[Message]:
        """The replies up to a pong: everything sent before it has been handled."""
        control.send_multipart(encode("ping", {"t": 0.0}))
        replies = []
        while True:
            assert control.poll(10_000), "the node did not answer"
            replies.append(decode(control.recv_multipart()))
            if replies[-1].kind == "pong":
                return replies[:-1]

    try:
        settled()
        rss_before = proc.memory_info().rss
        control.send_multipart(_deploy_begin(node, size=(2 << 30) - 1))  # a 300-byte message
        refusals = settled()  # (a node with under 2 GiB free refuses it outright)
        assert all(r.kind == "error" and "memory" in r.fields["reason"] for r in refusals)
        growth = proc.memory_info().rss - rss_before
        assert growth < 50 * MIB, f"the node grew by {growth / MIB:.0f} MiB on a declared size"
        for i in range(ACK_BYTES // MIB):  # taken, and said so once they make ACK_BYTES
            control.send_multipart(encode("deploy_chunk", {"offset": i * MIB},
                                          payload=bytes(MIB)))
        control.send_multipart(encode("deploy_chunk", {"offset": 50 * MIB}, payload=b"x"))
        replies = settled()
        if not refusals:  # the last chunk does not follow the others
            assert [(r.kind, r.fields.get("bytes")) for r in replies] == [
                ("received", ACK_BYTES), ("error", None)]
            assert f"does not follow {ACK_BYTES}" in replies[1].fields["reason"]
        growth = proc.memory_info().rss - rss_before
        assert growth < 50 * MIB, f"the node grew by {growth / MIB:.0f} MiB on 8 MiB of chunks"
        reply = _ask(control, encode("deploy_end", {"sha256": "0" * 64}))  # ends the upload
        assert reply.kind == "error"
    finally:
        control.close()
    node.computes(4)


def test_a_shard_larger_than_the_free_memory_is_refused_at_once() -> None:
    # In process, so that the node's own size limit can be lifted above the free memory.
    daemon = NodeDaemon(NodeConfig(name="tight", advertise=False, max_shard_bytes=1 << 60))
    daemon.start()
    serving = threading.Thread(target=daemon.serve_forever, daemon=True)
    serving.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.control_endpoint)
        size = int(psutil.virtual_memory().available) + (4 << 30)
        reply = _ask(sock, encode("deploy_begin", {
            "stage": 0, "stages": 1, "sha256": "0" * 64, "size": size, "inputs": [],
            "outputs": [], "next": "tcp://127.0.0.1:9", "results": "tcp://127.0.0.1:9"}))
        assert reply.kind == "error" and "of memory free on this node" in reply.fields["reason"]
        assert daemon._upload is None
    finally:
        sock.close()
        ctx.term()
        daemon.halt()
        serving.join(5)
        daemon.stop()


@pytest.mark.parametrize("workers", [1, 3])
def test_a_node_whose_thread_dies_stops_loudly_instead_of_staying_half_alive(
        monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """With several workers, one that dies (the last one started) ends them all and stops
    the node the same way."""
    daemon = NodeDaemon(NodeConfig(name="doomed", advertise=False, workers=workers))
    work = NodeDataPath._work

    def data_loop(self: NodeDataPath) -> None:
        doomed = "node-data" if workers == 1 else f"node-data-{workers - 1}"
        if threading.current_thread().name == doomed:
            raise RuntimeError("injected fault")
        work(self)

    monkeypatch.setattr(NodeDataPath, "_work", data_loop)
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            daemon.serve_forever()
        except BaseException as exc:
            raised.append(exc)

    daemon.start()
    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    try:
        serving.join(15)
        assert not serving.is_alive(), "the node kept serving without its data thread"
        assert len(raised) == 1 and isinstance(raised[0], ClusterError)
        assert "data thread died" in str(raised[0]) and "injected" in str(raised[0])
    finally:
        daemon.halt()
        serving.join(5)
        daemon.stop()


# ---------------------------------------------------------------------------- a hostile node


FAKE_ID = "f" * 32
FAKE_INFO = {"node": FAKE_ID, "name": "fake", "device": "fake-cpu", "data": "tcp://127.0.0.1:1",
             "cores": 4, "memory": 8 << 30, "free": 4 << 30, "speed": 1.5, "key": "",
             "stage": -1, "sha256": "", "exact": True, "master_silent_s": 0.0}
REPORT = {"node": FAKE_ID, "rss": 123, "mem": 10.0, "speed": 1.5}  # + "cpu": a serial number
EVIL_STATS = {"node": FAKE_ID, "cpu": 77.0, "rss": 666, "mem": 10.0, "speed": 9.0}
BAD_VALUES: list[tuple[str, str, Any]] = [  # each spoils one otherwise valid message
    ("info", "free", "lots"), ("info", "cores", "8"), ("info", "cores", 2**64 - 1),
    ("info", "memory", -(2**63)), ("info", "speed", float("nan")), ("info", "speed", "fast"),
    ("info", "data", "tcp://evil"), ("info", "node", 12345), ("info", "stage", "0"),
    ("info", "master_silent_s", float("inf")), ("info", "exact", "yes"),
    ("pong", "t", "x"), ("pong", "t", None), ("pong", "t", float("nan")), ("pong", "t", [1]),
    ("stats", "cpu", "x"), ("stats", "cpu", -1.0), ("stats", "cpu", float("inf")),
    ("stats", "rss", "big"), ("stats", "rss", -5), ("stats", "rss", 2**64 - 1),
    ("stats", "mem", 1e9), ("stats", "speed", -1), ("stats", "rejected", "many"),
    ("ready", "stage", "0"), ("ready", "stage", -1), ("ready", "provider", 5),
    ("error", "reason", 5), ("error", "reason", None), ("error", "stage", "x"),
]


def _hostile(rng: np.random.Generator, i: int) -> list[bytes]:
    """Message i of a stream of malformed node messages: never one the master may accept."""
    valid = {"info": {**FAKE_INFO, "name": "evil", "device": "evil", "cores": 64, "free": 1},
             "pong": {"t": 1.0}, "stats": EVIL_STATS, "ready": {"stage": 0, "provider": "evil"},
             "received": {"stage": 0, "bytes": 1}, "building": {"stage": 0},
             "error": {"reason": "evil"}}
    pick = i % 10
    if pick < 4:  # one field spoilt
        kind, key, value = BAD_VALUES[(i // 10 * 4 + pick) % len(BAD_VALUES)]
        return _frames(kind, {**valid[kind], key: value})
    if pick == 4:  # a required field missing
        kind = ("info", "pong", "stats", "ready", "error")[i // 10 % 5]
        fields = dict(valid[kind])
        fields.pop(next(k for k, f in KINDS[kind].items() if f.required))
        return _frames(kind, fields)
    if pick == 5:  # random bytes, in random frames
        return [rng.bytes(int(rng.integers(0, 300))) for _ in range(int(rng.integers(1, 4)))]
    if pick == 6:  # a tensor with an empty dim and huge others, in a control message
        return [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "stats", **EVIL_STATS,
                               "tensors": [["x", "float32", [0, 2**39, 2**39]]]}), b""]
    if pick == 7:  # nested too deep to unpack, or a header over the limit
        return [b"\x91" * 5000 + b"\xc0"] if i // 10 % 2 else [
            msgpack.packb({"v": PROTOCOL_VERSION, "kind": "error", "reason": "x" * (70 << 10)})]
    if pick == 8:  # not a message a node sends, or not a kind at all
        return _frames(("deploy_begin", "activation", "hello", "explode")[i // 10 % 4],
                       {"id": 1, "times": []})
    # a newer release's answer
    return [msgpack.packb({"v": PROTOCOL_VERSION + 1, **FAKE_INFO, "kind": "info"})]


class FakeNode:
    """A node that answers the master's hello and pings with bursts of malformed messages
    (and then the valid answer, so the master keeps it), on a thread of its own."""

    def __init__(self, total: int, burst: int = 150) -> None:
        self.total, self.burst = total, burst
        self.sent = 0
        self.stats_sent: list[float] = []
        self.rng = np.random.default_rng(11)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # block at the high-water mark: no drops
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True, name="fake-node")
        self.thread.start()

    @property
    def address(self) -> NodeAddress:
        return NodeAddress(node_id=FAKE_ID, name="fake", host="127.0.0.1", port=self.port,
                           properties={}, source="static")

    def _serve(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.sock.poll(50):
                    continue
                ident, *frames = self.sock.recv_multipart()
                msg = decode(frames)
                if msg.kind == "hello":  # its answer first: a master that waits for it takes
                    # a message of another version for a node of another release, and gives up
                    self.sock.send_multipart([ident, *encode("info", FAKE_INFO)])
                for _ in range(min(self.burst, self.total - self.sent)):
                    self.sock.send_multipart([ident, *_hostile(self.rng, self.sent)])
                    self.sent += 1
                if msg.kind == "ping":
                    self.sock.send_multipart([ident, *encode("pong", {"t": msg.fields["t"]})])
                    # a valid report after each burst: proof that the burst was read past
                    cpu = float(len(self.stats_sent))
                    self.sock.send_multipart([ident, *encode("stats", {**REPORT, "cpu": cpu})])
                    self.stats_sent.append(cpu)
        except BaseException as exc:
            self.error = exc
        finally:
            self.sock.close(linger=0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.ctx.term()


def test_a_hostile_node_leaves_the_master_whole(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR")  # thousands of rejections are logged; keep none of them here
    me = psutil.Process()
    with LocalCluster(1, secure=False) as local, local.master() as master:
        real = master.nodes[local.addresses[0].node_id]
        stats: list[ev.NodeStats] = []
        unsubscribe = master.bus.subscribe(
            lambda e: stats.append(e) if isinstance(e, ev.NodeStats) else None)
        rss_before = me.memory_info().rss
        fake = FakeNode(total=2_000)
        try:
            handle = master.connect(fake.address, timeout=30)
            assert handle.node_id == FAKE_ID
            wait_for(lambda: fake.sent >= fake.total or fake.error, 60,
                     "the fake node to send its 2,000 messages")
            assert fake.error is None, fake.error
            # every valid report sent after a burst arrives: all before it were read and dropped
            last = len(fake.stats_sent) - 1
            wait_for(lambda: any(e.node_id == FAKE_ID and e.cpu_percent == last
                                 for e in list(stats)), 30, "the last valid report")
            assert all(t.is_alive() for t in master._threads) and master.failure is None
            growth = me.memory_info().rss - rss_before
            assert growth < 100 * MIB, f"the master grew by {growth / MIB:.0f} MiB"
            # rejected cleanly: no handler failed on any of them (the loop would survive that)
            assert not [r.getMessage() for r in caplog.records if r.name.startswith("periphery")]
            # nothing malformed reached the master's state: not even its valid-looking part
            kept = master.nodes[FAKE_ID]
            assert (kept.name, kept.device, kept.cores, kept.memory, kept.free_memory,
                    kept.speed, kept.data_endpoint) == ("fake", "fake-cpu", 4, 8 << 30,
                                                        4 << 30, 1.5, "tcp://127.0.0.1:1")
            fake_stats = [e for e in list(stats) if e.node_id == FAKE_ID]
            assert [e.cpu_percent for e in fake_stats] == fake.stats_sent[:len(fake_stats)]
            assert all(e.rss_bytes == 123 for e in fake_stats)
            # the real node beside it is still heartbeated, and still computes
            mark = time.time()
            wait_for(lambda: real.last_seen > mark + master.heartbeat_s, 10,
                     "a heartbeat answer from the real node")
            assert not real.lost
            master.deploy([SHARD], [real.node_id], exact=True, timeout=60)
            x = np.ones((1, 32), np.float32)
            want = LocalChain([MODEL], SessionConfig(exact=True, threads=1)).run({"x": x})
            np.testing.assert_array_equal(master.submit({"x": x}).result(timeout=30)["y"],
                                          want["y"])
        finally:
            unsubscribe()
            fake.close()


def test_a_request_that_waited_for_a_busy_stage_counts_its_wait_as_queue() -> None:
    """The node's one data thread sees a request only when free: one already queued arrived
    when the stage before it sent it (its wait is queue time, not transfer), one it waited for
    arrived when taken, and a stamp that is not a number changes nothing."""
    from periphery_core.cluster.node_data import QUEUED_S, arrival
    from periphery_core.wire import Message

    def msg(times: list) -> Message:  # type: ignore[type-arg]
        return Message("activation", {"id": 1, "times": times}, {})

    upstream = [[0, 10.0, 10.0, 10.5, 10.6, 4096]]  # stage 0 sent it at 10.6
    assert arrival(msg(upstream), t_free=11.0, t_taken=11.0) == 10.6  # queued since 10.6
    assert arrival(msg(upstream), t_free=10.0, t_taken=10.7) == 10.7  # waited for it
    assert arrival(msg([]), t_free=11.0, t_taken=11.0 + QUEUED_S / 2) == 11.0  # from the master
    assert arrival(msg([[0, "x", 1, 2, "y"]]), t_free=11.0, t_taken=11.0) == 11.0
    assert arrival(msg(upstream), t_free=10.5, t_taken=10.5001) == 10.5001  # sent once free
