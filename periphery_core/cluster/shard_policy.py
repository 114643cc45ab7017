"""What a node accepts as a shard: a self-contained model, nothing that reaches its disk.

ONNX Runtime resolves a tensor's external-data `location` against the process's working
directory and reads any file below it. A shard that names, say, the node's key folder as
"weights" would have the node read its own secret key into a tensor and send it back as a
result. Periphery's shards always travel with their weights inline, so a node refuses any shard
that refers to external data, wherever the tensor sits: initializers, sparse initializers,
constant attributes, If/Loop/Scan bodies and model-local functions.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from periphery_core.errors import ClusterError


class ShardRefused(ClusterError):
    """A shard a node will not load."""


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


def _location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return "?"


def require_self_contained(model: onnx.ModelProto) -> None:
    """Refuse a shard whose tensors refer to data outside it.

    Raises:
        ShardRefused: a tensor's data is external (names the first one).
    """
    for tensor in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise ShardRefused(
                f"refused a shard whose tensor '{tensor.name}' refers to external data "
                f"('{_location(tensor)}'): a node loads only shards that carry their own "
                "weights")
