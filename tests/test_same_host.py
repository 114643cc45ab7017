"""Links between processes on one host: private Unix sockets instead of CurveZMQ TCP.

Real node processes with keys on. Local stages hand activations and results over sockets in
folders only this user can enter (big tensors through shared memory, wire/shm.py), and the
results equal the TCP path's bit for bit; a master
made with `same_host_ipc=False` wires every link over TCP; a node refuses a deploy that points
its outputs at any other Unix socket. (Links between hosts stay on CurveZMQ: the namespaces in
test_netns.py are other hosts, and no tensor byte crosses their wire in plaintext.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster.handles import NodeHandle
from periphery_core.cluster.keys import load_keyring
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.same_host import (
    PREFIX,
    PrivateFolder,
    bind_private,
    check_endpoint,
    host_identity,
    sweep_stale,
)
from periphery_core.discovery import NodeAddress
from periphery_core.errors import RequestFailed
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.planner import make_plan
from periphery_core.partition.verify import bit_identical
from periphery_core.runtime.feeds import random_feeds
from periphery_core.wire import decode, encode
from periphery_core.wire.shm import FREE, ShmWriter
from tests.conftest import ROOT, load_analyzed
from tests.models import mlp
from tests.streaming import save_mlp
from tests.test_shm import memfds
from tests.test_wire import _own_bytes
from tests.waiting import wait_for

DEMO = ROOT / "assets" / "demo-resnet.onnx"

pytestmark = pytest.mark.skipif(not host_identity(), reason="no /proc: every link is TCP here")


def _folder(endpoint: str) -> Path:
    return Path(endpoint.removeprefix("ipc://")).parent


def _private(path: Path) -> bool:
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)


def test_local_stages_use_private_sockets_and_equal_the_tcp_path_bit_for_bit() -> None:
    loaded, analysis = load_analyzed(DEMO)
    shards = [s.SerializeToString() for s in extract_shards(loaded, analysis,
                                                            make_plan(analysis, 2))]
    feeds = [random_feeds(analysis.inputs, i) for i in range(6)]
    outputs: dict[bool, list[dict[str, np.ndarray]]] = {}
    folders: list[Path] = []
    with LocalCluster(2) as local:
        for same_host in (True, False):
            links: list[tuple[str, ...]] = []
            with local.master(same_host_ipc=same_host) as master:
                master.bus.subscribe(lambda e, seen=links: seen.append(e.links)
                                     if isinstance(e, ev.DeployFinished) else None)
                nodes = [h.node_id for h in master.alive_nodes()]
                master.deploy(shards, nodes, exact=True)
                first = master._data._first[0].getsockopt(zmq.LAST_ENDPOINT).decode()
                outputs[same_host] = [master.submit(f).result(timeout=30) for f in feeds]
                # Each holds its own 40 bytes, not its message's receive buffer (test_wire.py).
                assert all(_own_bytes(v) for out in outputs[same_host] for v in out.values())
                if same_host:
                    assert links == [("ipc", "ipc")]  # stage 0 -> 1, stage 1 -> master
                    assert first.startswith("ipc://") and _private(_folder(first))
                    assert master._data.results_ipc and _private(_folder(
                        master._data.results_ipc))
                    folders += [_folder(first), _folder(master._data.results_ipc)]
                    # The 602 KiB inputs and 768 KiB activations went through shared memory
                    # (wire/shm.py), and each slot was given back once its stage had run.
                    slots = master._data._first_shm[0]
                    assert slots is not None and slots._slots
                    wait_for(lambda s=slots: all(x.map is not None and x.map[0] == FREE
                                                 for x in s._slots), 10,
                             "the first stage to give its input slots back")
                    # Stage 0 holds its slots, stage 1 its mappings of them.
                    assert all(memfds(n.process.pid) for n in local.nodes)
                else:
                    assert links == [("tcp", "tcp")] and first.startswith("tcp://")
    for got, want in zip(outputs[True], outputs[False], strict=True):
        assert set(got) == set(want)
        assert all(bit_identical(want[n], got[n]) for n in want)
    assert not any(f.exists() for f in folders), "a private folder outlived its process"
    assert not memfds(os.getpid()), "a closed master kept its shared memory"


def test_a_request_whose_shared_memory_the_node_cannot_read_fails_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot the node refuses fails its request in one line (never a request that waits for
    good), and the node computes the next one that comes in frames."""
    put = ShmWriter.put

    def stale(self: ShmWriter, arrays: list[np.ndarray]) -> list[int] | None:
        desc = put(self, arrays)  # the slot's inode as of another memfd: not the sender's
        return None if desc is None else [desc[0], desc[1], desc[2] + 1]

    _, analysis = load_analyzed(DEMO)
    feeds = random_feeds(analysis.inputs, 0)
    with LocalCluster(1) as local, local.master() as master:
        master.deploy([DEMO.read_bytes()], [local.addresses[0].node_id])
        want = master.submit(feeds).result(timeout=30)
        monkeypatch.setattr(ShmWriter, "put", stale)
        with pytest.raises(RequestFailed, match="stage 0 cannot read the tensors its sender "
                                                "left in shared memory: the shared-memory "
                                                "slot named is not the sender's"):
            master.submit(feeds).result(timeout=30)
        monkeypatch.setattr(ShmWriter, "put", lambda self, arrays: None)  # frames
        got = master.submit(feeds).result(timeout=30)
    assert all(bit_identical(want[n], got[n]) for n in want)


def test_links_between_hosts_stay_on_tcp_with_the_receivers_key() -> None:
    folder = PrivateFolder()

    def handle(host: str, name: str, ipc: str = "") -> NodeHandle:
        return NodeHandle(address=NodeAddress(name, name, "10.0.0.1", 1, {}, "static"),
                          node_id=name, host=host, data_ipc=ipc or f"ipc://{folder.path}/data",
                          data_endpoint=f"tcp://10.0.0.1:{len(name)}", key=name.encode())

    here = host_identity()
    a, b, far = handle(here, "a"), handle(here, "b"), handle("f" * 32, "far")
    # a node that names a socket outside a private folder of this user's
    liar = handle(here, "liar", ipc=f"ipc:///tmp/{PREFIX}nothere/data")
    try:
        with Master() as master:
            assert master._data_link(a, b) == (b.data_ipc, None)
            assert master._data_link(a, far) == (far.data_endpoint, far.key)
            assert master._data_link(far, a) == (a.data_endpoint, a.key)
            assert master._data_link(None, a) == (a.data_ipc, None)
            assert master._data_link(None, liar) == (liar.data_endpoint, liar.key)
            assert master._results_link(a)[0] == master._data.results_ipc
            assert master._results_link(far)[0].startswith("tcp://")
        with Master(same_host_ipc=False) as master:  # every link on TCP, even between a and b
            assert master._data_link(a, b) == (b.data_endpoint, b.key)
            assert master._results_link(a)[0].startswith("tcp://")
    finally:
        folder.remove()


@pytest.mark.parametrize("where", ["elsewhere", "open folder", "traversal"])
def test_a_deploy_pointing_a_node_at_another_unix_socket_is_refused(
        tmp_path: Path, where: str) -> None:
    if where == "elsewhere":
        endpoint, why = f"ipc://{tmp_path}/data", "not a Periphery socket"
    elif where == "open folder":
        folder = tmp_path / f"{PREFIX}open"
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
        endpoint, why = f"ipc://{folder}/data", "not a private folder"
    else:
        endpoint, why = f"ipc://{tmp_path}/../{PREFIX}x/data", "not a Periphery socket"
    assert why in (check_endpoint(endpoint) or "")
    with LocalCluster(1) as local:
        assert local.keys_dir is not None
        ring = load_keyring(local.keys_dir / "master")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:  # a trusted master's keys: only the endpoint is wrong
            sock.curve_secretkey, sock.curve_publickey = ring.secret, ring.public
            sock.curve_serverkey = next(iter(ring.nodes))
            sock.setsockopt(zmq.LINGER, 0)
            a = local.addresses[0]
            sock.connect(f"tcp://{a.host}:{a.port}")
            shard = save_mlp(tmp_path / "mlp.onnx").read_bytes()
            sock.send_multipart(encode("deploy_begin", {
                "stage": 0, "stages": 1, "sha256": "0" * 64, "size": len(shard), "inputs": [],
                "outputs": [], "next": endpoint, "results": endpoint, "exact": True,
                "epoch": 1, "next_key": "", "results_key": "", "reuse": False}))
            assert sock.poll(10_000), "the node did not answer the deploy"
            reply = decode(sock.recv_multipart())
            assert reply.kind == "error" and why in reply.fields["reason"], reply.fields
        finally:
            sock.close(linger=0)
            ctx.term()


def test_a_killed_local_node_leaves_no_folder_behind() -> None:
    with LocalCluster(2) as local, local.master() as master:
        sockets = [_folder(h.data_ipc) for h in master.alive_nodes()]
        assert len(sockets) == 2 and all(_private(f) for f in sockets)
        state = [f.parent for f in sockets]  # each node's state folder holds its sockets
        local.kill(1)  # SIGKILL: the node cleans nothing up itself
        local.nodes[1].process.wait(10)
        assert sockets[1].exists()
    assert not any(f.exists() for f in sockets + state), "a node's folder outlived the cluster"


def test_where_no_private_socket_can_be_made_the_links_stay_on_tcp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # too long a path for a Unix socket
    deep.mkdir(parents=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    try:
        assert bind_private(sock, "data", deep) == (None, "")
        assert list(deep.iterdir()) == []  # the folder it tried is gone
        folder, endpoint = bind_private(sock, "data", tmp_path)  # a short path works
        assert folder is not None and endpoint == f"ipc://{folder.path}/data"
        assert check_endpoint(endpoint) is None
    finally:
        sock.close(linger=0)
        ctx.term()


def test_the_socket_folders_of_killed_processes_are_swept(tmp_path: Path) -> None:
    """A process SIGKILLed with a private socket bound cannot remove its folder; the next one
    made removes it (its socket refuses connections). A folder still listened on, an empty one
    just made, and another user's stay; an empty one left long ago goes."""
    code = ("import sys, time, zmq\n"
            "from pathlib import Path\n"
            "from periphery_core.cluster.same_host import bind_private\n"
            "sock = zmq.Context().socket(zmq.PULL)\n"
            "folder, _ = bind_private(sock, 'data', Path(sys.argv[1]))\n"
            "print(folder.path, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        dead = Path(proc.stdout.readline().strip())  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert (dead / "data").exists()
    ctx = zmq.Context()
    live_sock = ctx.socket(zmq.PULL)
    live, _ = bind_private(live_sock, "results", tmp_path)
    try:
        assert live is not None and not dead.exists(), "swept when the next folder was made"
        fresh = tmp_path / f"{PREFIX}fresh"
        old = tmp_path / f"{PREFIX}old"
        theirs = tmp_path / f"{PREFIX}theirs"
        for folder in (fresh, old, theirs):
            folder.mkdir(mode=0o700)
        os.utime(old, (1, 1))
        os.chown(theirs, 65534, 65534)
        os.utime(theirs, (1, 1))
        assert sweep_stale(tmp_path) == 1
        assert live.path.exists() and fresh.exists() and theirs.exists() and not old.exists()
    finally:
        live_sock.close(linger=0)
        ctx.term()
        if live is not None:
            live.remove()


def _slot_inodes(pid: int) -> set[int]:
    """The inodes of the Periphery slots a process holds open (its own, or mapped)."""
    out = set()
    for fd in memfds(pid):
        try:
            out.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            continue
    return out


def test_a_master_lets_go_of_an_ended_nodes_memory_and_holds_none_once_closed(
        tmp_path: Path) -> None:
    """Results of 128 KiB come back through the last stage's slots, which the master maps.
    Once that node's process has ended and results come from another's slots, the master holds
    nothing of the ended one's (its mappings were the last hold on that memory); a closed
    master holds no slot at all."""
    model = mlp(width=64, layers=2, batch=512)  # y is 512 x 64 float32: 128 KiB
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    loaded, analysis = load_analyzed(path)
    feeds = [random_feeds(analysis.inputs, i) for i in range(4)]
    with LocalCluster(2) as local:
        master = local.master()
        try:
            nodes = [h.node_id for h in master.alive_nodes()]
            two = [s.SerializeToString() for s in extract_shards(loaded, analysis,
                                                                 make_plan(analysis, 2))]
            master.deploy(two, nodes, exact=True)
            for f in feeds:
                master.submit(f).result(timeout=30)
            last = local.nodes[1].process
            theirs = _slot_inodes(last.pid)
            assert theirs & _slot_inodes(os.getpid()), "the master should map the results' slots"
            local.kill(1)
            last.wait(10)
            one = [s.SerializeToString() for s in extract_shards(loaded, analysis,
                                                                 make_plan(analysis, 1))]
            master.deploy(one, nodes[:1], exact=True)
            for f in feeds:
                master.submit(f).result(timeout=30)
            assert _slot_inodes(local.nodes[0].process.pid) & _slot_inodes(os.getpid())
            assert not theirs & _slot_inodes(os.getpid()), "an ended node's memory is held"
        finally:
            master.close()
        assert not _slot_inodes(os.getpid()), "a closed master kept shared memory"
