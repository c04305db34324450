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


def whiten(matrix_t: Tensor, whitener: Tensor | None) -> Tensor:
    """L^T @ matrix_t, for a matrix given transposed (inputs along the rows)."""
    return matrix_t.double() if whitener is None else whitener.T @ matrix_t.double()


def whitener(moments: dict | None, name: str, with_constant: bool = False) -> Tensor | None:
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
        u, s, v = _low_rank_product(whiten(q.T, query_whitener), whiten(k.T, key_whitener))
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
        u, s, right = _low_rank_product(o, whiten(v.T, value_whitener))
        spectra.append((u, s, _unwhiten(right, value_whitener)))
    return spectra


def attention_spectra(attn: MultiHeadAttention, path: str, moments: dict | None = None):
    """(query/key spectra, value/output spectra) of the attention module at `path`."""
    qk = query_key_spectra(
        attn, whitener(moments, f"{path}.query", with_constant=True), whitener(moments, f"{path}.key")
    )
    return qk, value_out_spectra(attn, whitener(moments, f"{path}.value"))


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
    u, s, vh = _svd(whiten(linear.weight.detach().T, whitener).T)  # W L
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
    u, s, vh = _svd(whiten(rows[new.n_exact :].T, whitener).T)  # tail L
    root = s[:rank].sqrt()
    right = _unwhiten(vh[:rank].T, whitener)  # (n_state, rank): L^-T V
    with torch.no_grad():
        new.exact_t.copy_(rows[: new.n_exact].T)
        new.tail_proj.copy_(right * root)
        new.tail_t.copy_((u[:, :rank] * root).T)
    return new


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
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
        return name, factor_linear(model.get_submodule(name), rank, whitener(moments, name))
    weight = model.decoder.token_embedding.weight
    return name, factor_embedding(
        weight, exact_token_ids(model.dims, frequent_tokens), rank, whitener(moments, FINAL_STATE)
    )
