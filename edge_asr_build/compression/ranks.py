"""Rank allocation for the compress pass: matrices that share a rank (`Group`, their spectra), ranks from one
global target, allocated greedily by singular-value energy (`allocate_ranks`) or by measured output
distortion (`measure_groups`, `allocate_measured`: each matrix alone at each candidate rank, scored by the
logit KL against the unchanged model)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from edge_asr_build.compression.calibration import FINAL_STATE
from edge_asr_build.compression.factors import (
    DEFAULT_PARTS,
    MIN_RANK,
    attention_spectra,
    exact_token_ids,
    factored_module,
    set_module,
    whiten,
    whitener,
)
from edge_asr_build.whisper.model import MultiHeadAttention, Whisper


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
    s = torch.linalg.svdvals(whiten(linear.weight.detach().T, whitener).T).numpy()
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
                _linear_group(f"{name}.{p}", getattr(attn, p), whitener(moments, f"{name}.{p}"))
                for p in ("query", "key", "value", "out")
            ]
        else:
            raise ValueError("attention must be 'joint' or 'independent'")
    groups += [
        _linear_group(name, linear, whitener(moments, name)) for name, linear in _mlp_linears(model, parts).items()
    ]
    if "embedding" in parts:
        weight = model.decoder.token_embedding.weight.detach()
        exact = exact_token_ids(model.dims, frequent_tokens)
        tail = np.setdiff1d(np.arange(len(weight)), exact)
        s = torch.linalg.svdvals(whiten(weight[tail].T, whitener(moments, FINAL_STATE)).T).numpy()
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
        set_module(model, path, module)
        try:
            value = distortion.of(model, encoder_changed=path.startswith("encoder"))
        finally:
            set_module(model, path, original)
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
