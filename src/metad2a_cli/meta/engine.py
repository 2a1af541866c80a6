"""NumPy inference for the three MetaD2A networks.

``metad2a search`` must answer in about a second, and importing torch alone takes longer
than that on a small CPU. So search runs the trained networks here, in NumPy, from the same
safetensors weights the PyTorch modules in ``models/`` train and save (same parameter
names). Tests check both implementations agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..nb201.cells import EDGES, OPS
from ..nb201.graph import (
    INPUT_TYPE,
    NUM_NODE_TYPES,
    NUM_NODES,
    PREDECESSORS,
    SUCCESSORS,
)

Weights = Mapping[str, np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _linear(w: Weights, name: str, x: np.ndarray) -> np.ndarray:
    y = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def _one_hot(ids: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[ids]


# -- set encoder ----------------------------------------------------------------------------


def _mab(w: Weights, name: str, q: np.ndarray, k: np.ndarray, key_mask: np.ndarray, heads: int) -> np.ndarray:
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    q = _linear(w, f"{name}.q", q)
    dim = q.shape[-1]
    qh = q.reshape(b, nq, heads, -1).transpose(0, 2, 1, 3)
    kh = _linear(w, f"{name}.k", k).reshape(b, nk, heads, -1).transpose(0, 2, 1, 3)
    vh = _linear(w, f"{name}.v", k).reshape(b, nk, heads, -1).transpose(0, 2, 1, 3)
    scores = (qh @ kh.transpose(0, 1, 3, 2)) / np.sqrt(dim)
    scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = scores / scores.sum(-1, keepdims=True)
    o = (qh + attn @ vh).transpose(0, 2, 1, 3).reshape(b, nq, dim)
    return o + np.maximum(_linear(w, f"{name}.out", o), 0.0)


def _set_pool(w: Weights, name: str, x: np.ndarray, mask: np.ndarray, heads: int) -> np.ndarray:
    mask = mask | ~mask.any(-1, keepdims=True)
    x = _mab(w, f"{name}.sab1.mab", x, x, mask, heads)
    x = _mab(w, f"{name}.sab2.mab", x, x, mask, heads)
    seed = w[f"{name}.pool.seed"]
    pooled = _mab(w, f"{name}.pool.mab", np.broadcast_to(seed, (x.shape[0], *seed.shape[1:])), x, mask, heads)
    return _linear(w, f"{name}.proj", pooled)[:, 0]


def set_encode(w: Weights, name: str, x: np.ndarray, mask: np.ndarray, heads: int) -> np.ndarray:
    """(B, K, M, F), (B, K, M) -> (B, latent); the same computation as models.SetEncoder."""
    b, k, m, f = x.shape
    protos = _set_pool(w, f"{name}.intra", x.reshape(b * k, m, f), mask.reshape(b * k, m), heads)
    return _set_pool(w, f"{name}.inter", protos.reshape(b, k, -1), mask.any(-1), heads)


# -- graph GRUs -----------------------------------------------------------------------------


def _gru_cell(w: Weights, name: str, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    # PyTorch's GRUCell gate order: reset, update, new.
    gi = x @ w[f"{name}.weight_ih"].T + w[f"{name}.bias_ih"]
    gh = h @ w[f"{name}.weight_hh"].T + w[f"{name}.bias_hh"]
    i_r, i_z, i_n = np.split(gi, 3, axis=-1)
    h_r, h_z, h_n = np.split(gh, 3, axis=-1)
    r = _sigmoid(i_r + h_r)
    z = _sigmoid(i_z + h_z)
    n = np.tanh(i_n + r * h_n)
    return (1.0 - z) * n + z * h


def _message(w: Weights, name: str, states: list[np.ndarray], neighbours: list[int]) -> np.ndarray:
    h = np.stack([states[u] for u in neighbours], axis=1)  # (B, n, H)
    ids = np.broadcast_to(np.eye(NUM_NODES, dtype=h.dtype)[neighbours], (h.shape[0], len(neighbours), NUM_NODES))
    h = np.concatenate([h, ids], axis=-1)
    return (_sigmoid(_linear(w, f"{name}.gate", h)) * _linear(w, f"{name}.map", h)).sum(1)


def _dag_gru(w: Weights, name: str, types_one_hot: np.ndarray, reverse: bool) -> list[np.ndarray]:
    b = types_one_hot.shape[0]
    hidden = w[f"{name}.cell.weight_hh"].shape[1]
    states: list[np.ndarray] = [None] * NUM_NODES  # type: ignore[list-item]
    order = range(NUM_NODES - 1, -1, -1) if reverse else range(NUM_NODES)
    sources = SUCCESSORS if reverse else PREDECESSORS
    for v in order:
        if sources[v]:
            h_in = _message(w, f"{name}.message", states, sources[v])
        else:
            h_in = np.zeros((b, hidden), dtype=types_one_hot.dtype)
        states[v] = _gru_cell(w, f"{name}.cell", types_one_hot[:, v], h_in)
    return states


def graph_encode(w: Weights, types: np.ndarray) -> np.ndarray:
    """Node types (B, 8) -> cell embeddings (B, latent), as models.predictor.GraphEncoder."""
    oh = _one_hot(types, NUM_NODE_TYPES)
    h_fwd = _dag_gru(w, "predictor.graph_encoder.forward_gru", oh, reverse=False)[-1]
    h_bwd = _dag_gru(w, "predictor.graph_encoder.backward_gru", oh, reverse=True)[0]
    unified = _linear(w, "predictor.graph_encoder.unify", np.concatenate([h_fwd, h_bwd], -1))
    return _linear(w, "predictor.graph_encoder.out", unified)


# -- predictor head ---------------------------------------------------------------------------


def score(w: Weights, dataset: np.ndarray, graphs: np.ndarray, terms: tuple[str, ...], codes: np.ndarray) -> np.ndarray:
    """dataset (latent,) and cell embeddings (N, latent) of cells ``codes`` (N,) -> (N,)
    predicted scores: the sum of the predictor's trained terms (models/predictor.py)."""
    total = np.zeros(len(graphs), dtype=np.float32)
    if "table" in terms:
        table = _linear(w, "predictor.prior.2", np.tanh(_linear(w, "predictor.prior.0", graphs)))[:, 0]
        if "predictor.table_z" in w:  # checkpoints before it: the prior only
            known = w["predictor.table_z"][codes]
            table = np.where(np.isnan(known), table, known)
        total = total + table
    if "dataset" in terms:
        unit = dataset / max(float(np.linalg.norm(dataset)), 1e-12)  # as F.normalize
        edges = w["predictor.dataset_term.shared"] + w["predictor.dataset_term.by_dataset.weight"] @ unit  # (30,)
        total = total + edges[_edge_op_columns(codes)].sum(-1)
    return total


def _edge_op_columns(codes: np.ndarray) -> np.ndarray:
    """(N,) Cell.code -> (N, 6) the column of each edge's operation, as models.edge_term."""
    n_ops, n_edges = len(OPS), len(EDGES)
    place = n_ops ** np.arange(n_edges - 1, -1, -1)
    return codes[:, None] // place % n_ops + n_ops * np.arange(n_edges)


# -- generator ------------------------------------------------------------------------------


def generator_posterior(w: Weights, x: np.ndarray, mask: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    v = set_encode(w, "generator.set_encoder", x, mask, heads)
    return _linear(w, "generator.to_mu", v), _linear(w, "generator.to_logvar", v)


def generate(w: Weights, z: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Decode z (B, latent) into (B, 6) op indices; uniforms (B, 6) in [0, 1) drive the draws."""
    b = z.shape[0]
    h0 = np.tanh(_linear(w, "generator.z_to_h0", z))
    start = _one_hot(np.full(b, INPUT_TYPE), NUM_NODE_TYPES)
    states = [_gru_cell(w, "generator.cell", start, h0)]
    ops = np.empty((b, NUM_NODES - 2), dtype=np.int64)
    for v in range(1, NUM_NODES - 1):
        logits = _linear(w, "generator.type_head.2", np.maximum(_linear(w, "generator.type_head.0", states[-1]), 0.0))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        cdf = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
        op = np.minimum((cdf < uniforms[:, v - 1 : v]).sum(-1), cdf.shape[-1] - 1)
        ops[:, v - 1] = op
        h_in = _message(w, "generator.message", states, PREDECESSORS[v])
        states.append(_gru_cell(w, "generator.cell", _one_hot(op + 2, NUM_NODE_TYPES), h_in))
    return ops
