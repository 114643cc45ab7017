"""Walking an ONNX graph: subgraphs, what a node reads, unique node keys, constant nodes, and
nodes that compute on activations' shapes alone.

A node with a subgraph (If, Loop, Scan) reads, besides its explicit inputs, every name its
bodies take from the enclosing scope. The analysis, shard extraction and the stateful rewrite
all ask `node_inputs` what a node reads, so none of them misses those.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The node's graph-valued attributes: If branches, Loop and Scan bodies."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads that it does not define itself, recursively."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {i.name for i in graph.sparse_initializer if i.values.name}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= outer_scope_names(sub)
        defined.update(o for o in node.output if o)
    used.update(o.name for o in graph.output)
    return used - defined


def node_inputs(node: onnx.NodeProto) -> tuple[str, ...]:
    """A node's explicit inputs and its subgraphs' outer-scope references, in order, unique."""
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names.extend(sorted(outer_scope_names(sub)))
    return tuple(dict.fromkeys(names))


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


def constant_foldable(graph: onnx.GraphProto, keys: Sequence[str]) -> frozenset[str]:
    """Nodes whose every input is a weight or another such node's output.

    Standard-domain, deterministic, without subgraphs, and not producing a model output: their
    outputs are functions of the weights alone (a `Constant`, a weight `Reshape` or `Transpose`,
    a `ConstantOfShape` of a constant shape), so a stage can recompute them locally.
    """
    known = {i.name for i in graph.initializer} | {i.values.name for i in graph.sparse_initializer}
    outputs = {o.name for o in graph.output}
    found: set[str] = set()
    for node, key in zip(graph.node, keys, strict=True):
        if (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NONDETERMINISTIC
            and not any(True for _ in subgraphs(node))
            and all(not n or n in known for n in node.input)
            and not any(o in outputs for o in node.output)
        ):
            found.add(key)
            known.update(o for o in node.output if o)
    return frozenset(found)


def shape_only(graph: onnx.GraphProto, keys: Sequence[str],
               constants: frozenset[str]) -> frozenset[str]:
    """Nodes whose outputs depend on activations' shapes, never on their values.

    A `Shape` or `Size` node is one; so is a node whose every input is a weight, a constant
    node's output or such a node's output, with at least one of the last kind (else it is a
    constant). Standard-domain, deterministic, without subgraphs, and not producing a model
    output, like `constant_foldable`. Exporters such as torch.onnx emit long chains of them
    (`Shape`, `Gather`, `Unsqueeze`, `Concat`) to build a `Reshape`'s target shape, a `Slice`'s
    bounds or a causal mask: they are the plumbing of the node they feed, not steps of the
    model. One pass, since the graph's nodes are in topological order.

    Args:
        graph: The model's top-level graph.
        keys: A key per node, as from `node_keys`.
        constants: Keys of the constant nodes, as from `constant_foldable`.

    Returns:
        The keys of those nodes.
    """
    known = {i.name for i in graph.initializer} | {i.values.name for i in graph.sparse_initializer}
    outputs = {o.name for o in graph.output}
    shaped: set[str] = set()  # outputs of the nodes found so far
    found: set[str] = set()
    for node, key in zip(graph.node, keys, strict=True):
        made = [o for o in node.output if o]
        if key in constants:
            known.update(made)
            continue
        inputs = [n for n in node.input if n]
        if (
            node.domain in ("", "ai.onnx")
            and not any(o in outputs for o in made)
            and (
                node.op_type in ("Shape", "Size")
                or (
                    node.op_type not in _NONDETERMINISTIC
                    and not any(True for _ in subgraphs(node))
                    and any(n in shaped for n in inputs)
                    and all(n in shaped or n in known for n in inputs)
                )
            )
        ):
            found.add(key)
            shaped.update(made)
    return frozenset(found)


def node_keys(graph: onnx.GraphProto) -> list[str]:
    """A key per node, unique in the graph: the node's name when that is unique and non-empty,
    else `<op>_<index>` (with `_` appended until it is free)."""
    counts = Counter(n.name for n in graph.node)
    keys: list[str] = []
    taken = {n.name for n in graph.node if n.name and counts[n.name] == 1}
    for i, n in enumerate(graph.node):
        if n.name and counts[n.name] == 1:
            keys.append(n.name)
            continue
        key = f"{n.op_type}_{i}"
        while key in taken:
            key += "_"
        taken.add(key)
        keys.append(key)
    return keys
