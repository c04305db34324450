"""Compress pass: joint low-rank factorization of a Whisper model.

Three kinds of factors, each exact at full rank:

  * Attention "product twins". Per head, the attention scores depend on W_q and W_k only through the
    bilinear form [W_q | b_q]^T W_k (the query bias folded in by augmenting the input with a constant 1),
    and the head's output on W_v and W_o only through the map W_o W_v (the value bias folds into the
    output bias, since attention weights sum to one). Each pair is factored jointly by SVD of that
    product, which shrinks the head width to the rank: fewer parameters, and also smaller score and
    KV-cache tensors, where factoring each matrix alone would only add a second MatMul.
  * Linear layers (the feed-forward network): W = (U sqrt(S)) (sqrt(S) V^T), two thinner Linears.
  * The tied token embedding / output projection: the most frequent tokens (the lowest ids of the
    byte-level BPE, which are its earliest merges) and the special tokens stay exact; the other rows are
    factored. Truncating the whole matrix instead wrecks decoding (see the README).

Each factorization can be activation-aware: with the input moments of `calibration.collect_moments`, the
SVD is of W L (L L^T the input's second moment), which minimizes the error on the inputs the matrix sees
instead of the error of its entries; mapped back by L^-1 it stays exact at full rank.

Ranks come from one global target, a fraction of all parameters to keep or an energy threshold. They are
allocated greedily either by singular-value energy (the directions with the most normalized energy per
parameter first) or by measured output distortion (`measure_groups`, `allocate_measured`: each matrix
alone at each candidate rank, scored by the logit KL against the unchanged model). `compress_whisper`
returns the compressed copy and a report (ranks, parameters, reconstruction error).
A compressed model is saved as safetensors plus a JSON description of its shapes (`save_compressed`), so
loading it never unpickles anything.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from edge_asr_build.compression.calibration import FINAL_STATE
from edge_asr_build.whisper.model import ModelDimensions, MultiHeadAttention, Whisper

PARTS = ("encoder-attention", "encoder-mlp", "decoder-attention", "decoder-mlp", "embedding")
DEFAULT_PARTS = ("decoder-attention", "decoder-mlp", "embedding")
MIN_RANK = 4
N_TIMESTAMPS = 1501  # <|0.00|> … <|30.00|>, the last ids of every Whisper vocabulary


class FactoredLinear(nn.Module):
    """y = second(first(x)): a rank-r linear map as two Linears (two MatMuls in the exported graph)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


class FactoredTokenEmbedding(nn.Module):
    """Tied embedding with `exact_ids` kept as they are and the other rows factored to `rank`.

    Stored transposed, as the export wants it: the lookup is a Gather on the second axis and the output
    projection a MatMul, both reading the same tensor (one int8 copy after quantization).
      exact_t   (n_state, n_exact)  rows of the exact tokens
      tail_proj (n_state, rank)     shared right factor of the other rows
      tail_t    (rank, n_tail)      per-token left factors of the other rows
    `position[id]` is where a token sits in the concatenation [exact ids…, other ids…].
    """

    def __init__(self, n_vocab: int, n_state: int, exact_ids: list[int], rank: int):
        super().__init__()
        exact = torch.as_tensor(sorted(exact_ids), dtype=torch.long)
        is_exact = torch.zeros(n_vocab, dtype=torch.bool)
        is_exact[exact] = True
        order = torch.cat([exact, torch.nonzero(~is_exact).flatten()])
        self.register_buffer("position", torch.argsort(order), persistent=False)
        self.n_exact = len(exact)
        self.exact_t = nn.Parameter(torch.zeros(n_state, self.n_exact))
        self.tail_proj = nn.Parameter(torch.zeros(n_state, rank))
        self.tail_t = nn.Parameter(torch.zeros(rank, n_vocab - self.n_exact))

    def embed(self, tokens: Tensor) -> Tensor:
        position = self.position[tokens.reshape(-1)]
        exact = self.exact_t.index_select(1, position.clamp(max=self.n_exact - 1)).t()
        tail = self.tail_t.index_select(1, (position - self.n_exact).clamp(min=0)).t() @ self.tail_proj.t()
        rows = torch.where((position >= self.n_exact)[:, None], tail, exact)
        return rows.reshape(*tokens.shape, -1)

    def logits(self, x: Tensor) -> Tensor:
        return torch.cat([x @ self.exact_t, (x @ self.tail_proj) @ self.tail_t], dim=-1).index_select(-1, self.position)


def exact_token_ids(dims: ModelDimensions, frequent: int) -> list[int]:
    """The `frequent` lowest text ids plus the special tokens other than timestamps."""
    eot = 50257 if dims.is_multilingual else 50256
    return list(range(min(frequent, eot))) + list(range(eot, dims.n_vocab - N_TIMESTAMPS))


# --- the factorizations -------------------------------------------------------------------------------------


def _canonical_signs(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Singular pairs (u_j, v_j) with the sign fixed: the entry of u_j largest in magnitude positive.
    An SVD determines each pair only up to a common sign, and LAPACK builds pick differently: with another
    CPU's kernels a pair came out negated, the same product but other factors (scikit-learn's svd_flip)."""
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1
    return u * signs, v * signs


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    u, v = _canonical_signs(u, vh.T)
    return u, s, v.T


def _low_rank_product(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a @ b.T for tall a (m, k) and b (n, k) through their QR factors: U (m, k), S (k,), V (n, k)."""
    qa, ra = torch.linalg.qr(a.double())
    qb, rb = torch.linalg.qr(b.double())
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    left, right = _canonical_signs(qa @ u, qb @ vh.T)
    return left, s, right


def _split_heads(weight: Tensor, n_head: int) -> list[Tensor]:
    return list(weight.unflatten(0, (n_head, -1)))


# Activation-aware factors. With L the whitener of a matrix's input (L L^T = E[x x^T], `InputMoments`), the
# SVD of W L truncated to rank r and mapped back by L^-1 minimizes E||(W - W_r) x||^2 instead of ||W - W_r||.
# At full rank the mapping back undoes the whitening exactly. Without moments, L is the identity (plain SVD).


def _unwhiten(factor: Tensor, whitener: Tensor | None) -> Tensor:
    """L^-T @ factor: right factors in whitened coordinates, back in the input's own."""
    if whitener is None:
        return factor
    return torch.linalg.solve_triangular(whitener.T, factor, upper=True)


def _whiten(matrix_t: Tensor, whitener: Tensor | None) -> Tensor:
    """L^T @ matrix_t, for a matrix given transposed (inputs along the rows)."""
    return matrix_t.double() if whitener is None else whitener.T @ matrix_t.double()


def _whitener(moments: dict | None, name: str, with_constant: bool = False) -> Tensor | None:
    return None if moments is None else moments[name].whitener(with_constant)


def query_key_spectra(
    attn: MultiHeadAttention, query_whitener: Tensor | None = None, key_whitener: Tensor | None = None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per head, the SVD of the score form [W_q | b_q]^T W_k ((n_state + 1) x n_state), weighted on both
    sides by the whiteners of the query's input (with its constant 1) and the key's input: (U, S, V) with
    the form = U diag(S) V^T and S the whitened singular values."""
    query = torch.cat([attn.query.weight, attn.query.bias[:, None]], dim=1).detach()
    spectra = []
    for q, k in zip(_split_heads(query, attn.n_head), _split_heads(attn.key.weight.detach(), attn.n_head)):
        u, s, v = _low_rank_product(_whiten(q.T, query_whitener), _whiten(k.T, key_whitener))
        spectra.append((_unwhiten(u, query_whitener), s, _unwhiten(v, key_whitener)))
    return spectra


def value_out_spectra(
    attn: MultiHeadAttention, value_whitener: Tensor | None = None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per head, the SVD of the output map W_o,h W_v,h (n_state x n_state), weighted by the whitener of
    the value's input: (U, S, V) with the map = U diag(S) V^T."""
    out_heads = attn.out.weight.detach().unflatten(1, (attn.n_head, -1)).permute(1, 0, 2)  # (H, out, vo)
    spectra = []
    for o, v in zip(out_heads, _split_heads(attn.value.weight.detach(), attn.n_head)):
        u, s, right = _low_rank_product(o, _whiten(v.T, value_whitener))
        spectra.append((u, s, _unwhiten(right, value_whitener)))
    return spectra


def attention_spectra(attn: MultiHeadAttention, path: str, moments: dict | None = None):
    """(query/key spectra, value/output spectra) of the attention module at `path`."""
    qk = query_key_spectra(
        attn, _whitener(moments, f"{path}.query", with_constant=True), _whitener(moments, f"{path}.key")
    )
    return qk, value_out_spectra(attn, _whitener(moments, f"{path}.value"))


def factor_attention(attn: MultiHeadAttention, qk_rank: int, vo_rank: int, spectra=None) -> MultiHeadAttention:
    """A new attention module whose head widths are the ranks, from the product twins' SVDs (`spectra` from
    `attention_spectra`; default: plain SVD)."""
    n_state, n_head = attn.query.in_features, attn.n_head
    new = MultiHeadAttention(n_state, n_head, qk_rank, vo_rank)
    new.scale = attn.scale
    qk_spectra, vo_spectra = spectra or (query_key_spectra(attn), value_out_spectra(attn))
    queries, keys = [], []
    for u, s, v in qk_spectra:
        root = s[:qk_rank].sqrt()
        queries.append((u[:, :qk_rank] * root).T)  # (r, n_state + 1)
        keys.append((v[:, :qk_rank] * root).T)  # (r, n_state)
    values, outs = [], []
    for u, s, v in vo_spectra:
        root = s[:vo_rank].sqrt()
        outs.append(u[:, :vo_rank] * root)  # (n_state, r)
        values.append((v[:, :vo_rank] * root).T)  # (r, n_state)
    query = torch.cat(queries)
    out_bias = attn.out.bias.detach().double() + attn.out.weight.detach().double() @ attn.value.bias.detach().double()
    with torch.no_grad():
        new.query.weight.copy_(query[:, :-1])
        new.query.bias.copy_(query[:, -1])
        new.key.weight.copy_(torch.cat(keys))
        new.value.weight.copy_(torch.cat(values))
        new.value.bias.zero_()
        new.out.weight.copy_(torch.cat(outs, dim=1))
        new.out.bias.copy_(out_bias)
    return new


def factor_linear(linear: nn.Linear, rank: int, whitener: Tensor | None = None) -> FactoredLinear:
    """W x as second(first(x)) of rank `rank`, from the SVD of W L (L the input's whitener, default I)."""
    u, s, vh = _svd(_whiten(linear.weight.detach().T, whitener).T)  # W L
    root = s[:rank].sqrt()
    right = _unwhiten(vh[:rank].T, whitener).T  # (rank, in): V^T L^-1
    new = FactoredLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
    with torch.no_grad():
        new.first.weight.copy_(root[:, None] * right)
        new.second.weight.copy_(u[:, :rank] * root)
        if linear.bias is not None:
            new.second.bias.copy_(linear.bias)
    return new


def factor_embedding(
    weight: Tensor, exact_ids: list[int], rank: int, whitener: Tensor | None = None
) -> FactoredTokenEmbedding:
    """The tied embedding with `exact_ids` kept and the other rows factored to `rank`; with the whitener of
    the decoder's final state, the error is weighted as the output projection sees it (logit error)."""
    n_vocab, n_state = weight.shape
    new = FactoredTokenEmbedding(n_vocab, n_state, exact_ids, rank)
    order = torch.argsort(new.position)
    rows = weight.detach()[order]
    u, s, vh = _svd(_whiten(rows[new.n_exact :].T, whitener).T)  # tail L
    root = s[:rank].sqrt()
    right = _unwhiten(vh[:rank].T, whitener)  # (n_state, rank): L^-T V
    with torch.no_grad():
        new.exact_t.copy_(rows[: new.n_exact].T)
        new.tail_proj.copy_(right * root)
        new.tail_t.copy_((u[:, :rank] * root).T)
    return new


# --- rank allocation ----------------------------------------------------------------------------------------


@dataclass
class Group:
    """Matrices that share one rank: energy[j] is the squared singular value(s) of direction j."""

    name: str
    kind: str  # "twins-qk", "twins-vo", "linear", "embedding"
    energy: np.ndarray
    unit_cost: int  # parameters per unit of rank
    dense_cost: int  # parameters of the unfactored form
    max_rank: int  # beyond it the factored form is no smaller than the dense one
    rank: int | None = None  # None: left dense
    measured: dict[int, float] | None = None  # rank -> output distortion with this group alone factored

    @property
    def params(self) -> int:
        return self.dense_cost if self.rank is None else self.rank * self.unit_cost

    @property
    def relative_error(self) -> float:
        if self.rank is None:
            return 0.0
        return float(np.sqrt(max(0.0, 1 - self.energy[: self.rank].sum() / self.energy.sum())))


def _attention_modules(model: Whisper, parts) -> dict[str, MultiHeadAttention]:
    found = {}
    for side in ("encoder", "decoder"):
        if f"{side}-attention" not in parts:
            continue
        for i, block in enumerate(getattr(model, side).blocks):
            found[f"{side}.blocks.{i}.attn"] = block.attn
            if block.cross_attn is not None:
                found[f"{side}.blocks.{i}.cross_attn"] = block.cross_attn
    return found


def _mlp_linears(model: Whisper, parts) -> dict[str, nn.Linear]:
    found = {}
    for side in ("encoder", "decoder"):
        if f"{side}-mlp" in parts:
            for i, block in enumerate(getattr(model, side).blocks):
                found[f"{side}.blocks.{i}.mlp.0"], found[f"{side}.blocks.{i}.mlp.2"] = block.mlp[0], block.mlp[2]
    return found


def _linear_group(name: str, linear: nn.Linear, whitener: Tensor | None = None) -> Group:
    s = torch.linalg.svdvals(_whiten(linear.weight.detach().T, whitener).T).numpy()
    n_out, n_in = linear.weight.shape
    return Group(name, "linear", s**2, n_in + n_out, n_in * n_out, (n_in * n_out) // (n_in + n_out))


def collect_groups(
    model: Whisper,
    parts=DEFAULT_PARTS,
    attention: str = "joint",
    frequent_tokens: int = 4000,
    moments: dict | None = None,
) -> list[Group]:
    """One `Group` per factorable unit of `model` within `parts`; with `moments` (`calibration`), their
    spectra are the activation-weighted ones."""
    groups = []
    for name, attn in _attention_modules(model, parts).items():
        n_state, n_head = attn.query.in_features, attn.n_head
        if attention == "joint":
            qk_spectra, vo_spectra = attention_spectra(attn, name, moments)
            qk = sum(s.numpy() ** 2 for _, s, _ in qk_spectra)
            vo = sum(s.numpy() ** 2 for _, s, _ in vo_spectra)
            groups.append(
                Group(
                    name + ".qk",
                    "twins-qk",
                    qk,
                    n_head * (2 * n_state + 1),
                    attn.query.weight.numel() + attn.query.bias.numel() + attn.key.weight.numel(),
                    attn.qk_dim,
                )
            )
            # The value bias folds into the output bias but stays in the module (as zeros): r per head.
            groups.append(
                Group(
                    name + ".vo",
                    "twins-vo",
                    vo,
                    n_head * (2 * n_state + 1),
                    attn.value.weight.numel() + attn.value.bias.numel() + attn.out.weight.numel(),
                    attn.vo_dim,
                )
            )
        elif attention == "independent":
            groups += [
                _linear_group(f"{name}.{p}", getattr(attn, p), _whitener(moments, f"{name}.{p}"))
                for p in ("query", "key", "value", "out")
            ]
        else:
            raise ValueError("attention must be 'joint' or 'independent'")
    groups += [
        _linear_group(name, linear, _whitener(moments, name)) for name, linear in _mlp_linears(model, parts).items()
    ]
    if "embedding" in parts:
        weight = model.decoder.token_embedding.weight.detach()
        exact = exact_token_ids(model.dims, frequent_tokens)
        tail = np.setdiff1d(np.arange(len(weight)), exact)
        s = torch.linalg.svdvals(_whiten(weight[tail].T, _whitener(moments, FINAL_STATE)).T).numpy()
        n_state = weight.shape[1]
        groups.append(
            Group(
                "decoder.token_embedding",
                "embedding",
                s**2,
                len(tail) + n_state,
                len(tail) * n_state,
                len(tail) * n_state // (len(tail) + n_state),
            )
        )
    return groups


def allocate_ranks(groups: list[Group], budget: int | None = None, energy: float | None = None) -> None:
    """Set each group's rank, either to fit `budget` parameters in all groups together or to keep at least
    `energy` of each group's squared singular values. A group whose rank reaches the point where the
    factored form is no smaller is left dense."""
    if (budget is None) == (energy is None):
        raise ValueError("give exactly one of budget or energy")
    if energy is not None:
        for g in groups:
            rank = int(np.searchsorted(np.cumsum(g.energy) / g.energy.sum(), energy) + 1)
            g.rank = None if rank > g.max_rank else max(MIN_RANK, rank)
        return
    for g in groups:
        g.rank = MIN_RANK
    spent = sum(g.params for g in groups)
    if spent > budget:
        raise ValueError(
            f"the target is below the smallest factored model ({spent:,} parameters in the factored parts)"
        )
    # Fractional knapsack. A direction's value is its share of its group's energy over its share of the
    # group's dense parameters: each matrix counts by its size, and a flat spectrum is cut evenly. Within a
    # group the values fall with the index, so the greedy order always takes a prefix per group.
    units = sorted(
        (-g.energy[j] / g.energy.sum() * g.dense_cost / g.unit_cost, i, j)
        for i, g in enumerate(groups)
        for j in range(MIN_RANK, min(g.max_rank, len(g.energy)))
    )
    for _, i, j in units:
        g = groups[i]
        # The step that reaches max_rank turns the group dense: it costs whatever dense costs more.
        cost = g.unit_cost if g.rank + 1 < g.max_rank else g.dense_cost - g.rank * g.unit_cost
        if j != g.rank or spent + cost > budget:
            continue
        g.rank += 1
        spent += cost
    for g in groups:
        if g.rank >= g.max_rank:
            g.rank = None


def candidate_ranks(group: Group) -> list[int]:
    """The ranks at which a group's cost is measured: even steps below the point where factoring stops paying."""
    step = {"twins-qk": 8, "twins-vo": 8, "linear": 32, "embedding": 32}[group.kind]
    return [r for r in range(step, group.max_rank, step)]


def measure_groups(
    model: Whisper,
    groups: list[Group],
    distortion,
    moments: dict | None = None,
    frequent_tokens: int = 4000,
    progress=None,
) -> None:
    """Set each group's `measured`: the output distortion (`calibration.Distortion`) with that group alone
    factored at each candidate rank, every other matrix as it was."""
    jobs = [(g, r) for g in groups for r in candidate_ranks(g)]
    for g, rank in progress(jobs, "measure ranks") if progress else jobs:
        path, module = factored_module(model, g.name, g.kind, rank, moments, frequent_tokens)
        original = model.get_submodule(path)
        _set_module(model, path, module)
        try:
            value = distortion.of(model, encoder_changed=path.startswith("encoder"))
        finally:
            _set_module(model, path, original)
        g.measured = (g.measured or {}) | {rank: value}


def _lower_hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """The lower convex hull of (cost, distortion, rank) points, from the most to the least costly: the only
    options a greedy allocation should step through (a point above the hull is never the best trade)."""

    def slope(a, b):  # distortion added per unit of cost saved, going from a to the cheaper b
        return (b[1] - a[1]) / (a[0] - b[0])

    hull: list = []
    for p in sorted(points, key=lambda p: -p[0]):
        while len(hull) >= 2 and slope(hull[-2], hull[-1]) >= slope(hull[-2], p):
            hull.pop()
        hull.append(p)
    return hull


# What one unit of each group's parameters costs in multiply-accumulates per 30 s window: an encoder matrix
# runs on 1500 positions, a decoder matrix once per token (about 90 for 30 s of speech), the cross-attention
# keys and values once per window, and the embedding's lookup costs nothing (only its projection counts).
TOKENS_PER_WINDOW = 90


def _macs_per_param(group: Group) -> float:
    if group.name.startswith("encoder"):
        return 1500.0
    if ".cross_attn." in group.name:
        return (1500 + TOKENS_PER_WINDOW) / 2  # half of each twin is on the audio side
    return float(TOKENS_PER_WINDOW)


def allocate_measured(groups: list[Group], budget: float, cost: str = "params") -> None:
    """Set each group's rank from its measured distortions so that the groups' total `cost` ("params" or
    "macs") fits `budget`, adding as little distortion as the measurements allow. Distortions are taken to
    add up across groups; every group starts dense and gives up, step by step along its lower convex hull,
    the cut that costs the least distortion per unit saved."""
    if cost not in ("params", "macs"):
        raise ValueError("cost must be 'params' or 'macs'")
    weight = (lambda g: 1.0) if cost == "params" else _macs_per_param
    hulls = []
    for g in groups:
        if not g.measured:
            raise ValueError(f"{g.name} has no measured distortions (measure_groups)")
        points = [(g.dense_cost * weight(g), 0.0, None)] + [
            (r * g.unit_cost * weight(g), d, r) for r, d in g.measured.items()
        ]
        hulls.append(_lower_hull(points))
    position = [0] * len(groups)
    spent = sum(h[0][0] for h in hulls)
    while spent > budget:
        best, best_ratio = None, math.inf
        for i, hull in enumerate(hulls):
            if position[i] + 1 < len(hull):
                (c0, d0, _), (c1, d1, _) = hull[position[i]], hull[position[i] + 1]
                ratio = (d1 - d0) / (c0 - c1)
                if ratio < best_ratio:
                    best, best_ratio = i, ratio
        if best is None:
            raise ValueError(f"the budget ({budget:,.0f}) is below the smallest measured model ({spent:,.0f})")
        spent -= hulls[best][position[best]][0] - hulls[best][position[best] + 1][0]
        position[best] += 1
    for g, hull, i in zip(groups, hulls, position):
        g.rank = hull[i][2]


# --- the pass -----------------------------------------------------------------------------------------------


@dataclass
class CompressionReport:
    params_before: int
    params_after: int
    groups: list[Group] = field(default_factory=list)

    def table(self) -> str:
        measured = any(g.measured for g in self.groups)
        lines = [
            f"{'matrix':36} {'kind':10} {'rank':>6} {'of':>5} {'params before':>14} {'after':>10} {'rel. error':>10}"
            + (f" {'KL alone':>9}" if measured else "")
        ]
        for g in self.groups:
            rank = "dense" if g.rank is None else str(g.rank)
            kl = (g.measured or {}).get(g.rank, 0.0) if g.rank is not None else 0.0
            lines.append(
                f"{g.name:36} {g.kind:10} {rank:>6} {len(g.energy):>5} {g.dense_cost:>14,} {g.params:>10,} "
                f"{g.relative_error:>10.4f}" + (f" {kl:>9.5f}" if measured else "")
            )
        lines.append(
            f"{'total (all weights)':36} {'':10} {'':>6} {'':>5} {self.params_before:>14,} "
            f"{self.params_after:>10,}  ({1 - self.params_after / self.params_before:.1%} fewer)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "groups": [
                {
                    "name": g.name,
                    "kind": g.kind,
                    "rank": g.rank,
                    "full_rank": len(g.energy),
                    "params_before": g.dense_cost,
                    "params_after": g.params,
                    "relative_error": round(g.relative_error, 6),
                    "measured_kl": None if not g.measured or g.rank is None else g.measured.get(g.rank),
                }
                for g in self.groups
            ],
        }


def structure_of(groups: list[Group], frequent_tokens: int, dims: ModelDimensions) -> dict:
    """The shapes of a compressed model, enough to rebuild it before loading its weights."""
    structure: dict = {"twins": {}, "linear": {}, "embedding": None}
    for g in groups:
        if g.rank is None:
            continue
        if g.kind.startswith("twins"):
            module, pair = g.name.rsplit(".", 1)
            structure["twins"].setdefault(module, {"qk": None, "vo": None})[pair] = g.rank
        elif g.kind == "linear":
            structure["linear"][g.name] = g.rank
        else:
            structure["embedding"] = {
                "frequent_tokens": frequent_tokens,
                "rank": g.rank,
                "exact_ids": len(exact_token_ids(dims, frequent_tokens)),
            }
    return structure


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = path.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, module)


def factored_module(
    model: Whisper, name: str, kind: str, rank: int, moments: dict | None = None, frequent_tokens: int = 4000
) -> tuple[str, nn.Module]:
    """(module path, factored module) for one group of `model` alone at `rank`: a product twin (the other
    twin of the same attention kept at full width), a linear layer or the embedding."""
    if kind.startswith("twins"):
        path, pair = name.rsplit(".", 1)
        attn = model.get_submodule(path)
        ranks = {pair: rank, ("vo" if pair == "qk" else "qk"): attn.query.in_features // attn.n_head}
        new = factor_attention(attn, ranks["qk"], ranks["vo"], attention_spectra(attn, path, moments))
        new.factored = True
        return path, new
    if kind == "linear":
        return name, factor_linear(model.get_submodule(name), rank, _whitener(moments, name))
    weight = model.decoder.token_embedding.weight
    return name, factor_embedding(
        weight, exact_token_ids(model.dims, frequent_tokens), rank, _whitener(moments, FINAL_STATE)
    )


def apply_structure(
    model: Whisper, structure: dict, weights_from_svd: bool = True, moments: dict | None = None
) -> Whisper:
    """Replace modules of `model` (in place) by their factored forms. With `weights_from_svd`, the factors
    are computed from the current weights (activation-aware where `moments` are given); otherwise they are
    left for `load_state_dict` to fill."""
    dims = model.dims
    for path, ranks in structure["twins"].items():
        attn = model.get_submodule(path)
        head_dim = attn.query.in_features // attn.n_head
        qk, vo = ranks["qk"] or head_dim, ranks["vo"] or head_dim
        if weights_from_svd:
            new = factor_attention(attn, qk, vo, attention_spectra(attn, path, moments))
        else:
            new = MultiHeadAttention(attn.query.in_features, attn.n_head, qk, vo)
        new.factored = True
        _set_module(model, path, new)
    for path, rank in structure["linear"].items():
        linear = model.get_submodule(path)
        _set_module(
            model,
            path,
            factor_linear(linear, rank, _whitener(moments, path))
            if weights_from_svd
            else FactoredLinear(linear.in_features, linear.out_features, rank, linear.bias is not None),
        )
    if structure.get("embedding"):
        spec = structure["embedding"]
        exact = exact_token_ids(dims, spec["frequent_tokens"])
        weight = model.decoder.token_embedding.weight
        model.decoder.token_embedding = (
            factor_embedding(weight, exact, spec["rank"], _whitener(moments, FINAL_STATE))
            if weights_from_svd
            else FactoredTokenEmbedding(dims.n_vocab, dims.n_text_state, exact, spec["rank"])
        )
    model.compression = structure
    return model


# Probes per side of each tensor's sketch, and the largest fingerprint distance that still counts as the same
# factors. The compact recipe's factors, rebuilt at 1 thread instead of 2, moved by 1.2e-5; under generic
# SSE4.2 kernels instead of AVX2 by 7.8e-5; from calibration audio of another seed by 2.0 (singular vectors
# flip and turn). tests/test_compress.py holds the tolerance at least 10x away from both sides.
FINGERPRINT_PROBES = 4
FACTORS_TOLERANCE = 1e-2


def factors_fingerprint(model: Whisper) -> dict:
    """A small sketch of every weight of a (compressed) model, to recognise the same factors on another CPU.

    Each tensor W, seen as a matrix (its first axis by the rest), is summarised by its norm ‖W‖ and
    S = Uᵀ W V, where U and V have FINGERPRINT_PROBES columns of ±1 drawn from a generator seeded by the
    tensor's name: the same probes on every machine. Since E‖Uᵀ D V‖² = k² ‖D‖² for such probes, two
    sketches estimate how far apart their tensors are (`fingerprint_distance`) without storing them.
    A bit-exact digest would not do: SVD, Cholesky and matrix products differ in their last bits from
    one CPU's kernels, or thread count, to another's."""
    import zlib

    k, tensors = FINGERPRINT_PROBES, {}
    for name, value in model.state_dict().items():
        w = value.detach().double().cpu().numpy()
        w = w.reshape(w.shape[0] if w.ndim else 1, -1)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        u = rng.integers(0, 2, (w.shape[0], k)) * 2.0 - 1
        v = rng.integers(0, 2, (w.shape[1], k)) * 2.0 - 1
        sketch = u.T @ w @ v
        tensors[name] = {
            "norm": float(f"{np.linalg.norm(w):.9g}"),
            "sketch": [float(f"{x:.9g}") for x in sketch.ravel()],
        }
    return {"probes": k, "tensors": tensors}


def fingerprint_distance(a: dict, b: dict) -> float:
    """The largest relative difference ‖W_a − W_b‖ / ‖W_b‖ over the tensors of two fingerprints, as their
    sketches estimate it (inf where they hold different tensors or probes)."""
    if a["probes"] != b["probes"] or a["tensors"].keys() != b["tensors"].keys():
        return float("inf")
    k, worst = a["probes"], 0.0
    for name, ref in b["tensors"].items():
        got, scale = a["tensors"][name], max(ref["norm"], 1e-12)
        sketch = np.linalg.norm(np.subtract(got["sketch"], ref["sketch"])) / k
        worst = max(worst, sketch / scale, abs(got["norm"] - ref["norm"]) / scale)
    return worst


def compress_whisper(
    model: Whisper,
    keep: float | None = None,
    energy: float | None = None,
    parts=DEFAULT_PARTS,
    attention: str = "joint",
    frequent_tokens: int = 4000,
    moments: dict | None = None,
    distortion=None,
    progress=None,
) -> tuple[Whisper, CompressionReport]:
    """A compressed copy of `model`: `keep` is the fraction of all its parameters to keep (embedding,
    norms and positional tables included), or `energy` the share of each matrix's energy to keep.

    With `moments` (`calibration.collect_moments`) the factors are activation-aware. With `distortion`
    (`calibration.Distortion`), ranks come from the measured output distortion of each matrix at each
    candidate rank (`measure_groups`, `allocate_measured`) instead of from singular-value energy."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    before = model.parameter_count()
    groups = collect_groups(model, parts, attention, frequent_tokens, moments)
    budget = None
    if keep is not None:
        if not 0 < keep <= 1:
            raise ValueError("keep must be a fraction in (0, 1]")
        fixed = before - sum(g.dense_cost for g in groups)
        budget = int(keep * before) - fixed
        if budget <= 0:
            raise ValueError(f"keeping {keep:.0%} leaves nothing for the factored parts: compress more of the model")
    if distortion is not None:
        if budget is None:
            raise ValueError("measured ranks need a parameter target (keep)")
        measure_groups(model, groups, distortion, moments, frequent_tokens, progress)
        allocate_measured(groups, budget)
    else:
        allocate_ranks(groups, budget=budget, energy=energy)
    compressed = apply_structure(
        copy.deepcopy(model), structure_of(groups, frequent_tokens, model.dims), moments=moments
    )
    return compressed, CompressionReport(before, compressed.parameter_count(), groups)


# --- saving and loading -------------------------------------------------------------------------------------


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(weights, description) of a compressed checkpoint named by either file or by their common stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.parent / (stem.name + ".safetensors"), stem.parent / (stem.name + ".json")


def save_compressed(model: Whisper, path: Path, extra: dict | None = None) -> Path:
    """`path`.safetensors with the weights and `path`.json with dims, structure and `extra`; returns the
    JSON's path."""
    from safetensors.torch import save_file

    weights, description = checkpoint_files(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The positional table too: a source may carry its own rounding of the sinusoids (float16 in CTranslate2).
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    meta = {
        "dims": model.dims.to_dict(),
        "structure": getattr(model, "compression", None),
        "pruned": getattr(model, "pruned", None),
    } | (extra or {})
    description.write_text(json.dumps(meta, indent=2) + "\n")
    return description


def load_compressed(path: Path) -> tuple[Whisper, dict]:
    from safetensors.torch import load_file

    weights, description = checkpoint_files(path)
    meta = json.loads(description.read_text())
    model = Whisper(ModelDimensions(**meta["dims"]))
    if meta.get("structure"):
        apply_structure(model, meta["structure"], weights_from_svd=False)
    state = load_file(str(weights))
    missing = model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise ValueError(f"{path}: weights missing for {sorted(missing)[:3]}")
    model.pruned = meta.get("pruned")
    return model.eval(), meta
