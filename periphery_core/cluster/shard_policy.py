"""What a node accepts in a deploy: where its outputs go, and a shard that reaches no disk.

A deploy names where the stage's outputs go: activations only to a node, results only to a
master, each trusted by its key (over TCP; a private socket of this host admits no one else,
same_host.py). `check_destinations` refuses anything else.

The shard must be a self-contained model, nothing that reaches the node's disk.

ONNX Runtime resolves a tensor's external-data `location` against the process's working
directory and reads any file below it. A shard that names, say, the node's key folder as
"weights" would have the node read its own secret key into a tensor and send it back as a
result. So a node refuses any shard that refers to external data, wherever the tensor sits:
initializers, sparse initializers, constant attributes, If/Loop/Scan bodies and model-local
functions. The one exception is made before this check, by the node itself: a main-graph
initializer naming only an offset and a length into the bytes the deploy carried after the
model (shard_load.py), which the node then points at the file it wrote them to.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import onnx

from periphery_core.cluster import same_host
from periphery_core.cluster.keys import KeyRing
from periphery_core.errors import ClusterError
from periphery_core.model.loading import external_location
from periphery_core.wire import WireError


class ShardRefused(ClusterError):
    """A shard a node will not load."""


def check_destinations(f: Mapping[str, Any], ring: KeyRing | None) -> None:
    """Refuse a deploy_begin whose `next` or `results` endpoint the node may not send to.

    Raises:
        WireError: what is wrong, in one line.
    """
    for key in ("next", "results"):
        endpoint = f[key]
        if same_host.is_ipc(endpoint) and (why := same_host.check_endpoint(endpoint)):
            raise WireError(f"deploy_begin '{key}': {why}")
    if not ring:
        return
    last = f["next"] == f["results"]
    for key, trusted, who in (
            ("next", *((ring.masters, "a master") if last else (ring.nodes, "a node"))),
            ("results", ring.masters, "a master")):
        if same_host.is_ipc(f[key]):
            continue
        if not f.get(f"{key}_key"):
            raise WireError(f"deploy_begin needs '{key}_key' on a secure cluster")
        if f[f"{key}_key"].encode() not in trusted:
            what = "next stage" if key == "next" else "results endpoint"
            raise WireError(f"deploy_begin names a {what} whose key is not trusted as "
                            f"{who} here")


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for s in [*sparse, *attr.sparse_tensors]:
            yield s.values
            yield s.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a model, nested graphs and functions included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def require_self_contained(model: onnx.ModelProto) -> None:
    """Refuse a shard whose tensors refer to data outside it.

    Raises:
        ShardRefused: a tensor's data is external (names the first one).
    """
    for tensor in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise ShardRefused(
                f"refused a shard whose tensor '{tensor.name}' refers to external data "
                f"('{external_location(tensor) or '?'}'): a node loads only shards that carry "
                "their own weights")
