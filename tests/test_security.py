"""The audit's findings against live node processes with keys on: a shard cannot read the
node's files, a node key cannot act as a master, a deploy cannot point a node at an untrusted
peer, one bad candidate does not end a run, and a bad output path is one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq
from onnx import TensorProto, helper

from periphery_core.cluster.keys import load_keyring
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.shard_policy import ShardRefused, require_self_contained
from periphery_core.errors import ClusterError
from periphery_core.wire import decode, encode
from tests.streaming import save_mlp

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _reader_shard(location: str, length: int) -> bytes:
    """y = x + W, where W's bytes are 'external data' at `location`: the audit's attack."""
    weight = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[length])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "reader",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [length])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [length])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def test_a_shard_reading_a_file_next_to_the_node_is_refused() -> None:
    with LocalCluster(1) as local, local.master() as master:
        node = psutil.Process(local.nodes[0].process.pid)
        cwd = Path(node.cwd())
        # the node works in a private folder of its own, not where it was started
        assert cwd != Path.cwd() and oct(cwd.stat().st_mode & 0o777) == "0o700"
        secret = b"pretend this is a key_secret file"
        (cwd / "secret.bin").write_bytes(secret)
        handle = next(iter(master.nodes.values()))
        with pytest.raises(ClusterError, match="external data"):
            master.deploy([_reader_shard("secret.bin", len(secret))], [handle.node_id])
        # the node keeps serving: a self-contained shard deploys and runs
        model = save_mlp(cwd / "mlp.onnx")
        master.deploy([model.read_bytes()], [handle.node_id])
        x = np.ones((8, 256), np.float32)
        assert master.submit({"x": x}).result(timeout=30)["h11"].shape == (8, 256)


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph", "function"])
def test_external_data_is_found_wherever_the_tensor_sits(where: str) -> None:
    ext = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1])
    ext.data_location = TensorProto.EXTERNAL
    entry = ext.external_data.add()
    entry.key, entry.value = "location", "keys/n1.key_secret"
    const = helper.make_node("Constant", [], ["c"], value=ext)
    inner = helper.make_graph([const], "body", [], [helper.make_tensor_value_info(
        "c", TensorProto.FLOAT, [1])])
    nodes = {"initializer": [helper.make_node("Identity", ["W"], ["y"])],
             "constant": [const, helper.make_node("Identity", ["c"], ["y"])],
             "subgraph": [helper.make_node("If", ["b"], ["y"], then_branch=inner,
                                           else_branch=inner)],
             "function": [helper.make_node("F", [], ["y"], domain="local")]}[where]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [ext] if where == "initializer" else [])
    functions = [helper.make_function("local", "F", [], ["c"], [const],
                                      [helper.make_opsetid("", 17)])] if where == "function" \
        else []
    model = helper.make_model(graph, functions=functions,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("local", 1)])
    with pytest.raises(ShardRefused, match=r"keys/n1\.key_secret"):
        require_self_contained(model)
    inline = helper.make_tensor("W", TensorProto.FLOAT, [1], [1.0])
    require_self_contained(helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["W"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [inline])))


def test_a_node_key_cannot_act_as_a_master() -> None:
    with LocalCluster(2) as local:
        assert local.keys_dir is not None
        node_key = load_keyring(local.keys_dir / "local0")
        with Master(keys=node_key) as impostor, pytest.raises(ClusterError,
                                                              match="did not answer"):
            impostor.connect(local.addresses[1], timeout=3)
        with local.master() as master:  # the real master still gets in
            assert len(master.nodes) == 2


def test_a_deploy_naming_an_untrusted_next_stage_is_refused() -> None:
    with LocalCluster(1) as local:
        assert local.keys_dir is not None
        ring = load_keyring(local.keys_dir / "master")
        stranger = zmq.curve_keypair()[0]  # a key that no folder trusts
        node_key = next(iter(ring.nodes))
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.curve_secretkey, sock.curve_publickey = ring.secret, ring.public
            sock.curve_serverkey = node_key
            sock.setsockopt(zmq.LINGER, 0)
            a = local.addresses[0]
            sock.connect(f"tcp://{a.host}:{a.port}")
            shard = save_mlp(Path(local.keys_dir) / "mlp.onnx").read_bytes()
            sock.send_multipart(encode("deploy_begin", {
                "stage": 0, "stages": 1, "sha256": "0" * 64, "size": len(shard), "inputs": [],
                "outputs": [], "next": "tcp://127.0.0.1:9", "results": "tcp://127.0.0.1:8",
                "exact": True, "epoch": 1, "next_key": stranger.decode(),
                "results_key": ring.public.decode(), "reuse": False}))
            assert sock.poll(10_000), "the node did not answer the deploy"
            reply = decode(sock.recv_multipart())
            assert reply.kind == "error" and "not trusted" in reply.fields["reason"]
        finally:
            sock.close(linger=0)
            ctx.term()


def test_run_skips_an_unreachable_candidate_and_completes_on_the_others(tmp_path: Path) -> None:
    model = save_mlp(tmp_path / "mlp.onnx")
    plan = tmp_path / "plan.json"
    cli = [sys.executable, "-m", "periphery_core.cli.main"]
    subprocess.run([*cli, "plan", model, "--shards", "2", "-o", plan], check=True, env=ENV,
                   capture_output=True, cwd=tmp_path)
    with LocalCluster(2, secure=False) as local:
        peers = ["--peer", "127.0.0.1:9"]  # nothing listens there
        for a in local.addresses:
            peers += ["--peer", f"{a.host}:{a.port}"]
        out = subprocess.run([*cli, "run", model, "--plan", plan, *peers, "--insecure",
                              "--no-mdns", "--requests", "20", "--check"],
                             capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "skipping node 127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr
    assert "20/20 requests" in out.stdout


@pytest.mark.parametrize("command", [["plan", "--shards", "2", "-o", "{f}/plan.json"],
                                     ["shard", "--shards", "2", "-o", "{f}/out"]])
def test_an_output_path_that_cannot_be_written_is_one_line(tmp_path: Path,
                                                           command: list[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = save_mlp(tmp_path / "mlp.onnx")
    args = [a.replace("{f}", str(blocker)) for a in command]
    out = subprocess.run([sys.executable, "-m", "periphery_core.cli.main", args[0], str(model),
                          *args[1:]], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "internal" not in lines[0]
    assert "a-file" in lines[0]
