"""The spectral strategy: spectral clustering of the graph, repaired into contiguous stages.

Nodes are clustered by the bytes of the tensors between them, so heavy edges stay inside a
stage; the clusters are then ordered and split until they are K contiguous stages of a
topological order, which the cost model evaluates like any other segmentation. SciPy is
imported only when this strategy runs.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np

from periphery_core.partition.cost_model import GraphFacts, PlanningGraph


def spectral_cuts(
    facts: GraphFacts, graph: PlanningGraph, order: Sequence[int], k: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Spectral clustering, repaired into K contiguous stages of a topological order.

    Nodes are joined by edges weighted with the bytes of the tensors between them (plus a faint
    chain along the order, so the graph is connected); the rows of the K eigenvectors of the
    normalised Laplacian with the smallest eigenvalues are clustered by k-means from a
    deterministic farthest-point start. Clusters are then ranked by mean position, labels are
    made monotone along edges (a node goes no earlier than its producers), empty labels are
    dropped, a cluster that computes nothing joins its neighbour (a transformer's constants
    form clusters of their own: no bytes tie them to the compute, and a stage of them would
    do nothing), and the clusters are split at cost quantiles until there are K, each extra
    stage going to the cluster whose stages would otherwise cost most.

    Returns:
        The order (sorted by label, then position in ``order``) and its K-1 cuts.
    """
    from scipy.cluster.vq import kmeans2
    from scipy.sparse import coo_matrix, diags, identity
    from scipy.sparse.linalg import eigsh

    n = facts.n
    pos = np.empty(n, dtype=np.int64)
    pos[list(order)] = np.arange(n)
    if k == 1:
        return tuple(order), ()

    rows: list[int] = []
    cols: list[int] = []
    weights: list[float] = []
    for t, cons in enumerate(facts.consumers):
        u = facts.producer[t]
        if u < 0:
            continue
        for v in cons:
            rows.append(u)
            cols.append(v)
            weights.append(float(facts.tensor_bytes[t]))
    w = np.asarray(weights, dtype=np.float64)
    scale = float(w.max()) if w.size and w.max() > 0 else 1.0
    w = w / scale + 1e-3  # a zero-byte edge still ties its nodes together
    chain = np.asarray(order, dtype=np.int64)
    rows_a = np.concatenate((rows, chain[:-1])).astype(np.int64)
    cols_a = np.concatenate((cols, chain[1:])).astype(np.int64)
    w = np.concatenate((w, np.full(n - 1, 1e-6)))
    adj = coo_matrix((w, (rows_a, cols_a)), shape=(n, n)).tocsr()
    adj = (adj + adj.T).tocsr()
    deg = np.asarray(adj.sum(axis=1)).ravel()
    d_inv_sqrt = diags(1.0 / np.sqrt(deg))
    lap = (identity(n, format="csr") - d_inv_sqrt @ adj @ d_inv_sqrt).tocsc()

    if n <= 400 or k + 1 >= n:
        _, vecs = np.linalg.eigh(lap.toarray())
        emb = vecs[:, :k]
    else:
        v0 = np.cos(np.arange(n, dtype=np.float64))  # a fixed start: eigsh is otherwise random
        vals, vecs = eigsh(lap, k=k, sigma=-1e-3, which="LM", v0=v0)
        emb = vecs[:, np.argsort(vals)]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)

    # Farthest-point start from the first node of the order, then Lloyd iterations.
    centres = [int(chain[0])]
    dist = np.linalg.norm(emb - emb[centres[0]], axis=1)
    for _c in range(1, k):
        nxt = int(np.argmax(dist))
        centres.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(emb - emb[nxt], axis=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, labels = kmeans2(emb, emb[centres].copy(), iter=20, minit="matrix")

    # Rank clusters by mean position; then no node earlier than its producers.
    present = np.unique(labels)
    means = np.array([pos[labels == c].mean() for c in present])
    rank = {int(c): r for r, c in enumerate(present[np.lexsort((present, means))])}
    label = np.array([rank[int(c)] for c in labels], dtype=np.int64)
    for v in chain:
        for t in facts.node_inputs[int(v)]:
            u = facts.producer[t]
            if u >= 0 and label[u] > label[v]:
                label[v] = label[u]
    new_order = sorted(range(n), key=lambda v: (int(label[v]), int(pos[v])))
    groups: list[list[int]] = []
    for v in new_order:
        if groups and label[groups[-1][-1]] == label[v]:
            groups[-1].append(v)
        else:
            groups.append([v])

    costs = [graph.nodes[v].cost_s for v in range(n)]
    groups = _join_free_groups(groups, costs)
    groups = _split_to(groups, costs, k)
    while len(groups) > k:  # pragma: no cover - labels never exceed k; kept for safety
        i = min(range(len(groups) - 1), key=lambda i: len(groups[i]) + len(groups[i + 1]))
        groups[i : i + 2] = [groups[i] + groups[i + 1]]
    cuts = tuple(int(c) for c in np.cumsum([len(g) for g in groups])[:-1])
    return tuple(v for g in groups for v in g), cuts


def _join_free_groups(groups: list[list[int]], costs: Sequence[float]) -> list[list[int]]:
    """Adjacent groups merged so that every group computes something (where any does): a free
    group joins the one after it, a free last group the one before it."""
    joined: list[list[int]] = []
    for g in groups:
        if joined and math.fsum(costs[v] for v in joined[-1]) == 0.0:
            joined[-1] = joined[-1] + g
        else:
            joined.append(list(g))
    if len(joined) > 1 and math.fsum(costs[v] for v in joined[-1]) == 0.0:
        last = joined.pop()
        joined[-1] = joined[-1] + last
    return joined


def _split_to(groups: list[list[int]], costs: Sequence[float], k: int) -> list[list[int]]:
    """The groups split into `k` in all: each extra piece goes to the group whose pieces would
    cost most (its cost over its pieces), and a group is cut where its running cost crosses
    each equal share."""
    pieces = [1] * len(groups)
    cost = [math.fsum(costs[v] for v in g) for g in groups]
    for _ in range(k - len(groups)):
        i = max((i for i, g in enumerate(groups) if len(g) > pieces[i]),
                key=lambda i: (cost[i] / pieces[i], len(groups[i]), -i))
        pieces[i] += 1
    out: list[list[int]] = []
    for g, p, total in zip(groups, pieces, cost, strict=True):
        cuts: list[int] = []
        acc, share = 0.0, 1
        for at in range(1, len(g)):
            acc += costs[g[at - 1]]
            # cut once the running cost reaches the next share, leaving a node for each piece
            if len(cuts) < p - 1 and (acc >= total * share / p or len(g) - at == p - 1 - len(cuts)):
                cuts.append(at)
                share += 1
        bounds = [0, *cuts, len(g)]
        out.extend(g[a:b] for a, b in itertools.pairwise(bounds))
    return out
