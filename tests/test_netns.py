"""Two hosts in Linux network namespaces: a node in its own namespace, the master outside, a
veth pair between them. Traffic captured on the veth must carry no plaintext tensor bytes when
the cluster has keys (and does carry them with --insecure: the capture really sees the data).

Needs root and iproute2; skipped, saying why, elsewhere. Traffic goes only to the two veth
addresses this test creates.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from periphery_core.cluster.keys import init_cluster_keys, load_keyring
from periphery_core.cluster.master import Master
from periphery_core.discovery import NodeAddress
from tests.streaming import mlp_workload, stream
from tests.waiting import wait_for

CANARY = b"PERIPHERY-PLAINTEXT-CANARY-0123456789abcdef"  # ASCII: positive float32 words, no NaN


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def veth():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"pph{tag}", f"pphh{tag}", f"pphn{tag}"
    subnet = 200 + int(tag[:2], 16) % 50
    host_ip, ns_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    try:
        _run("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        _run("ip", "-n", ns, "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", ns, "link", "set", ns_if, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, host_if, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Capture:
    """Every frame seen on one interface, read with a raw AF_PACKET socket.

    The socket is bound before the constructor returns, so every frame that crosses the
    interface after that is queued on it; `stop` reads what is still queued, so nothing needs
    a pause to be seen.
    """

    def __init__(self, interface: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.data += self.sock.recv(65536)
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(2)
        assert not self._thread.is_alive(), "the capture thread did not stop"
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.data += self.sock.recv(65536)
        self.sock.close()
        return bytes(self.data)


def _identity_model(path: Path, n: int) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "canary",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, path)
    return path


def _start_node(ns: str, ns_ip: str, keys: Path | None,
                name: str = "nsnode") -> tuple[subprocess.Popen, str]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "periphery_core.cli.node",
           "--host", ns_ip, "--port", "0", "--no-advertise", "--name", name]
    cmd += ["--keys", str(keys)] if keys else ["--insecure"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert "periphery-node ready" in line, line
    port = line.split("control=tcp://")[1].split()[0].rsplit(":", 1)[1]
    return proc, port


@pytest.mark.parametrize("secure", [True, False], ids=["keys", "insecure"])
def test_no_plaintext_tensor_bytes_on_the_wire(veth, tmp_path: Path, secure: bool) -> None:
    ns, host_if, host_ip, ns_ip = veth
    payload = np.frombuffer(CANARY * 64, dtype=np.float32).copy()
    model = _identity_model(tmp_path / "canary.onnx", payload.size)
    keys = init_cluster_keys(tmp_path / "keys", ["master"], ["nsnode"]) if secure else None
    proc, port = _start_node(ns, ns_ip, keys[1] if keys else None)
    capture = None
    try:
        ring = load_keyring(keys[0]) if keys else None
        node_key = load_keyring(keys[1]).public.decode() if keys else None
        with Master(host=host_ip, keys=ring) as master:
            address = NodeAddress("nsnode", "nsnode", ns_ip, int(port),
                                  {"key": node_key} if node_key else {}, "static")
            handle = master.connect(address, timeout=10)
            master.deploy([model.read_bytes()], [handle.node_id])
            capture = Capture(host_if)
            # the result is back: the request and its reply have both crossed the veth
            result = master.submit({"x": payload}).result(timeout=30)
            seen = capture.stop()
            capture = None
    finally:
        if capture is not None:
            capture.stop()
        proc.terminate()
        proc.wait(10)
    assert result["y"].tobytes() == payload.tobytes()
    assert len(seen) > payload.nbytes, "the capture saw too little traffic to judge"
    if secure:
        assert CANARY not in seen, "tensor bytes crossed the wire in plaintext"
    else:
        assert CANARY in seen, "the capture did not see the plaintext it should have"


@pytest.fixture
def bridged_hosts():
    """Three namespaces on one bridge with the master's address on the bridge itself."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = secrets.token_hex(2)
    subnet = 100 + int(tag[:2], 16) % 90
    bridge = f"pphb{tag}"
    hosts = [(f"pph{tag}n{i}", f"pph{tag}h{i}", f"pph{tag}p{i}", f"10.232.{subnet}.{10 + i}")
             for i in range(3)]
    created: list[str] = []
    try:
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"10.232.{subnet}.1/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for ns, host_if, ns_if, ip in hosts:
            _run("ip", "netns", "add", ns)
            created.append(ns)
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _run("ip", "link", "set", ns_if, "netns", ns)
            _run("ip", "link", "set", host_if, "master", bridge)
            _run("ip", "link", "set", host_if, "up")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns_if)
            _run("ip", "-n", ns, "link", "set", ns_if, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        pytest.skip(f"cannot build the test network here: {exc.stderr.decode().strip()}")
    try:
        yield f"10.232.{subnet}.1", hosts
    finally:
        for _, host_if, _, _ in hosts:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_a_link_down_mid_stream_costs_no_request_and_the_node_rejoins(
    bridged_hosts, tmp_path: Path
) -> None:
    from periphery_core.cluster import events as ev
    from periphery_core.cluster.pipeline import Pipeline

    master_ip, hosts = bridged_hosts
    names = [f"node{i}" for i in range(3)]
    keys = init_cluster_keys(tmp_path / "keys", ["master"], names)
    procs = []
    try:
        addresses = []
        for i, (ns, _, _, ip) in enumerate(hosts):
            proc, port = _start_node(ns, ip, keys[i + 1], names[i])
            procs.append(proc)
            key = load_keyring(keys[i + 1]).public.decode()
            addresses.append(NodeAddress(names[i], names[i], ip, int(port), {"key": key},
                                         "static"))
        work = mlp_workload(tmp_path, seed=2, inputs=10)
        with Master(host=master_ip, keys=load_keyring(keys[0])) as master:
            handles = [master.connect(a, timeout=10) for a in addresses]
            rejoined = threading.Event()
            lost = threading.Event()

            def watch(e: object) -> None:
                if isinstance(e, ev.NodeLost):
                    lost.set()
                elif isinstance(e, ev.NodeJoined) and lost.is_set():
                    rejoined.set()

            master.bus.subscribe(watch)
            pipeline = Pipeline(master, work.loaded, work.analysis, k=3, exact=True)
            pipeline.deploy([h.node_id for h in handles])

            def cut_node1(i: int) -> None:
                if i == 100:
                    _run("ip", "link", "set", hosts[1][1], "down")

            results = stream(pipeline, work.pool, 300, 12, cut_node1)
            assert lost.is_set() and len(pipeline.recoveries) == 1
            rec = pipeline.recoveries[0]
            print(f"\nlink down: serving again {rec.recovered_s:.2f} s after the loss was "
                  f"declared, {rec.replayed} requests replayed")
            _run("ip", "link", "set", hosts[1][1], "up")
            assert rejoined.wait(20), "node1 did not rejoin after its link came back"
            # ... and the pipeline spreads back over all three hosts while serving.
            wait_for(lambda: len(pipeline.assignment) == 3, 30,
                     "the pipeline to spread back over node1")
            results += stream(pipeline, work.pool, 60, 12)
            pipeline.close()
        assert len(results) == 360
        work.assert_matches(results)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
