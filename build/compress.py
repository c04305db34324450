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

Ranks come from one global target, a fraction of all parameters to keep or an energy threshold, and are
allocated greedily: the singular directions that hold the most normalized energy per parameter first.
`compress_whisper` returns the compressed copy and a report (ranks, parameters, reconstruction error).
A compressed model is saved as safetensors plus a JSON description of its shapes (`save_compressed`), so
loading it never unpickles anything.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .whisper_model import ModelDimensions, MultiHeadAttention, Whisper

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

def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u, s, vh


def _low_rank_product(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a @ b.T for tall a (m, k) and b (n, k) through their QR factors: U (m, k), S (k,), V (n, k)."""
    qa, ra = torch.linalg.qr(a.double())
    qb, rb = torch.linalg.qr(b.double())
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, qb @ vh.T


def _split_heads(weight: Tensor, n_head: int) -> list[Tensor]:
    return list(weight.unflatten(0, (n_head, -1)))


def query_key_spectra(attn: MultiHeadAttention) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per head, the SVD of the score form [W_q | b_q]^T W_k ((n_state + 1) x n_state)."""
    query = torch.cat([attn.query.weight, attn.query.bias[:, None]], dim=1).detach()
    return [_low_rank_product(q.T, k.T) for q, k in zip(_split_heads(query, attn.n_head),
                                                          _split_heads(attn.key.weight.detach(), attn.n_head))]


def value_out_spectra(attn: MultiHeadAttention) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per head, the SVD of the output map W_o,h W_v,h (n_state x n_state)."""
    out_heads = attn.out.weight.detach().unflatten(1, (attn.n_head, -1)).permute(1, 0, 2)  # (H, out, vo)
    return [_low_rank_product(o, v.T) for o, v in zip(out_heads, _split_heads(attn.value.weight.detach(), attn.n_head))]


def factor_attention(attn: MultiHeadAttention, qk_rank: int, vo_rank: int) -> MultiHeadAttention:
    """A new attention module whose head widths are the ranks, from the product twins' SVDs."""
    n_state, n_head = attn.query.in_features, attn.n_head
    new = MultiHeadAttention(n_state, n_head, qk_rank, vo_rank)
    new.scale = attn.scale
    queries, keys = [], []
    for u, s, v in query_key_spectra(attn):
        root = s[:qk_rank].sqrt()
        queries.append((u[:, :qk_rank] * root).T)   # (r, n_state + 1)
        keys.append((v[:, :qk_rank] * root).T)      # (r, n_state)
    values, outs = [], []
    for u, s, v in value_out_spectra(attn):
        root = s[:vo_rank].sqrt()
        outs.append(u[:, :vo_rank] * root)          # (n_state, r)
        values.append((v[:, :vo_rank] * root).T)    # (r, n_state)
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


def factor_linear(linear: nn.Linear, rank: int) -> FactoredLinear:
    u, s, vh = _svd(linear.weight.detach())
    root = s[:rank].sqrt()
    new = FactoredLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
    with torch.no_grad():
        new.first.weight.copy_(root[:, None] * vh[:rank])
        new.second.weight.copy_(u[:, :rank] * root)
        if linear.bias is not None:
            new.second.bias.copy_(linear.bias)
    return new


def factor_embedding(weight: Tensor, exact_ids: list[int], rank: int) -> FactoredTokenEmbedding:
    n_vocab, n_state = weight.shape
    new = FactoredTokenEmbedding(n_vocab, n_state, exact_ids, rank)
    order = torch.argsort(new.position)
    rows = weight.detach()[order]
    u, s, vh = _svd(rows[new.n_exact:])
    root = s[:rank].sqrt()
    with torch.no_grad():
        new.exact_t.copy_(rows[: new.n_exact].T)
        new.tail_proj.copy_((root[:, None] * vh[:rank]).T)
        new.tail_t.copy_((u[:, :rank] * root).T)
    return new


# --- rank allocation ----------------------------------------------------------------------------------------

@dataclass
class Group:
    """Matrices that share one rank: energy[j] is the squared singular value(s) of direction j."""

    name: str
    kind: str                 # "twins-qk", "twins-vo", "linear", "embedding"
    energy: np.ndarray
    unit_cost: int            # parameters per unit of rank
    dense_cost: int           # parameters of the unfactored form
    max_rank: int             # beyond it the factored form is no smaller than the dense one
    rank: int | None = None   # None: left dense

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


def _linear_group(name: str, linear: nn.Linear) -> Group:
    s = torch.linalg.svdvals(linear.weight.detach().double()).numpy()
    n_out, n_in = linear.weight.shape
    return Group(name, "linear", s ** 2, n_in + n_out, n_in * n_out, (n_in * n_out) // (n_in + n_out))


def collect_groups(model: Whisper, parts=DEFAULT_PARTS, attention: str = "joint", frequent_tokens: int = 4000) -> list[Group]:
    """One `Group` per factorable unit of `model` within `parts`."""
    groups = []
    for name, attn in _attention_modules(model, parts).items():
        n_state, n_head = attn.query.in_features, attn.n_head
        if attention == "joint":
            qk = sum(s.numpy() ** 2 for _, s, _ in query_key_spectra(attn))
            vo = sum(s.numpy() ** 2 for _, s, _ in value_out_spectra(attn))
            groups.append(Group(name + ".qk", "twins-qk", qk, n_head * (2 * n_state + 1),
                                attn.query.weight.numel() + attn.query.bias.numel() + attn.key.weight.numel(), attn.qk_dim))
            # The value bias folds into the output bias but stays in the module (as zeros): r per head.
            groups.append(Group(name + ".vo", "twins-vo", vo, n_head * (2 * n_state + 1),
                                attn.value.weight.numel() + attn.value.bias.numel() + attn.out.weight.numel(), attn.vo_dim))
        elif attention == "independent":
            groups += [_linear_group(f"{name}.{p}", getattr(attn, p)) for p in ("query", "key", "value", "out")]
        else:
            raise ValueError("attention must be 'joint' or 'independent'")
    groups += [_linear_group(name, linear) for name, linear in _mlp_linears(model, parts).items()]
    if "embedding" in parts:
        weight = model.decoder.token_embedding.weight.detach()
        exact = exact_token_ids(model.dims, frequent_tokens)
        tail = np.setdiff1d(np.arange(len(weight)), exact)
        s = torch.linalg.svdvals(weight[tail].double()).numpy()
        n_state = weight.shape[1]
        groups.append(Group("decoder.token_embedding", "embedding", s ** 2, len(tail) + n_state,
                            len(tail) * n_state, len(tail) * n_state // (len(tail) + n_state)))
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
        raise ValueError(f"the target is below the smallest factored model ({spent:,} parameters in the factored parts)")
    # Fractional knapsack. A direction's value is its share of its group's energy over its share of the
    # group's dense parameters: each matrix counts by its size, and a flat spectrum is cut evenly. Within a
    # group the values fall with the index, so the greedy order always takes a prefix per group.
    units = sorted((-g.energy[j] / g.energy.sum() * g.dense_cost / g.unit_cost, i, j) for i, g in enumerate(groups)
                   for j in range(MIN_RANK, min(g.max_rank, len(g.energy))))
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


# --- the pass -----------------------------------------------------------------------------------------------

@dataclass
class CompressionReport:
    params_before: int
    params_after: int
    groups: list[Group] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'matrix':36} {'kind':10} {'rank':>6} {'of':>5} {'params before':>14} {'after':>10} {'rel. error':>10}"]
        for g in self.groups:
            rank = "dense" if g.rank is None else str(g.rank)
            lines.append(f"{g.name:36} {g.kind:10} {rank:>6} {len(g.energy):>5} {g.dense_cost:>14,} {g.params:>10,} "
                         f"{g.relative_error:>10.4f}")
        lines.append(f"{'total (all weights)':36} {'':10} {'':>6} {'':>5} {self.params_before:>14,} "
                     f"{self.params_after:>10,}  ({1 - self.params_after / self.params_before:.1%} fewer)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "groups": [{"name": g.name, "kind": g.kind, "rank": g.rank, "full_rank": len(g.energy),
                            "params_before": g.dense_cost, "params_after": g.params,
                            "relative_error": round(g.relative_error, 6)} for g in self.groups]}


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
            structure["embedding"] = {"frequent_tokens": frequent_tokens, "rank": g.rank,
                                      "exact_ids": len(exact_token_ids(dims, frequent_tokens))}
    return structure


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = path.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, module)


def apply_structure(model: Whisper, structure: dict, weights_from_svd: bool = True) -> Whisper:
    """Replace modules of `model` (in place) by their factored forms. With `weights_from_svd`, the factors
    are computed from the current weights; otherwise they are left for `load_state_dict` to fill."""
    dims = model.dims
    for path, ranks in structure["twins"].items():
        attn = model.get_submodule(path)
        head_dim = attn.query.in_features // attn.n_head
        qk, vo = ranks["qk"] or head_dim, ranks["vo"] or head_dim
        new = factor_attention(attn, qk, vo) if weights_from_svd else MultiHeadAttention(attn.query.in_features, attn.n_head, qk, vo)
        new.factored = True
        _set_module(model, path, new)
    for path, rank in structure["linear"].items():
        linear = model.get_submodule(path)
        _set_module(model, path, factor_linear(linear, rank) if weights_from_svd else
                    FactoredLinear(linear.in_features, linear.out_features, rank, linear.bias is not None))
    if structure.get("embedding"):
        spec = structure["embedding"]
        exact = exact_token_ids(dims, spec["frequent_tokens"])
        weight = model.decoder.token_embedding.weight
        model.decoder.token_embedding = (factor_embedding(weight, exact, spec["rank"]) if weights_from_svd else
                                         FactoredTokenEmbedding(dims.n_vocab, dims.n_text_state, exact, spec["rank"]))
    model.compression = structure
    return model


def compress_whisper(model: Whisper, keep: float | None = None, energy: float | None = None, parts=DEFAULT_PARTS,
                     attention: str = "joint", frequent_tokens: int = 4000) -> tuple[Whisper, CompressionReport]:
    """A compressed copy of `model`: `keep` is the fraction of all its parameters to keep (embedding,
    norms and positional tables included), or `energy` the share of each matrix's energy to keep."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    before = model.parameter_count()
    groups = collect_groups(model, parts, attention, frequent_tokens)
    budget = None
    if keep is not None:
        if not 0 < keep <= 1:
            raise ValueError("keep must be a fraction in (0, 1]")
        fixed = before - sum(g.dense_cost for g in groups)
        budget = int(keep * before) - fixed
        if budget <= 0:
            raise ValueError(f"keeping {keep:.0%} leaves nothing for the factored parts: compress more of the model")
    allocate_ranks(groups, budget=budget, energy=energy)
    compressed = apply_structure(copy.deepcopy(model), structure_of(groups, frequent_tokens, model.dims))
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
    meta = {"dims": model.dims.to_dict(), "structure": getattr(model, "compression", None)} | (extra or {})
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
    return model.eval(), meta
