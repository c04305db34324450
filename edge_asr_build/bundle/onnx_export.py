"""Export pass: a `Whisper` module to two ONNX graphs that a torch-free runtime can drive.

  encoder.onnx  mel (B, n_mels, 3000) -> cross_k_i (B, H, qk_dim, 1500), cross_v_i (B, H, 1500, vo_dim)
      The audio encoder plus every decoder layer's cross-attention key/value projection: those depend on
      the audio alone, so they are computed once per window, not once per token.
  decoder.onnx  tokens (B, T), self_k_i (B, H, qk_dim, P), self_v_i (B, H, P, vo_dim), cross_k_i, cross_v_i
                -> logits (B, n_vocab) of the last token, new_self_k_i, new_self_v_i extended to P + T
      Incremental decoding with an explicit self-attention KV cache; P = 0 on the first call.

One input per layer and keys stored transposed: a decoding step then neither splits a stacked cache nor
transposes the 1500-frame cross-attention keys, which otherwise costs more than the step's arithmetic.

The encoder's self-attention is ONNX Runtime's fused MultiHeadAttention (com.microsoft): its CPU kernel
works through the keys in blocks (flash attention) instead of holding every head's T x T scores and their
softmax, which were most of a window's memory. Measured on the dynamic-context int8 bundle, peak RSS
above the loaded sessions while encoding: a 30 s window 165 MB -> 60 MB, a 12 s window 43 -> 22 MB; the
same transcripts and RTF on dev/ljspeech.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from edge_asr_build.whisper.model import TokenEmbedding, Whisper

OPSET = 17


class TransposedTokenEmbedding(nn.Module):
    """The tied embedding stored as (n_state, n_vocab), for export.

    The output projection is then a plain MatMul against this initializer and the lookup a Gather on its
    second axis, so both share one tensor (one int8 copy after quantization) instead of the exporter
    folding a second, transposed copy of the largest matrix in the model.
    """

    def __init__(self, embedding: TokenEmbedding):
        super().__init__()
        self.weight_t = nn.Parameter(embedding.weight.detach().t().contiguous())

    def embed(self, tokens: Tensor) -> Tensor:
        return self.weight_t.index_select(1, tokens.reshape(-1)).t().reshape(*tokens.shape, -1)

    def logits(self, x: Tensor) -> Tensor:
        return x @ self.weight_t


def cache_names(prefix: str, n_layer: int) -> list[str]:
    """Graph input/output names of per-layer keys and values: prefix_k_0, prefix_v_0, prefix_k_1, …"""
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("k", "v")]


def _flatten(pairs) -> list[Tensor]:
    return [t for pair in pairs for t in pair]


def _pairs(flat) -> list[tuple[Tensor, Tensor]]:
    return list(zip(flat[0::2], flat[1::2]))


class _FusedAttention(torch.autograd.Function):
    """Attention over (B, T, H * head_dim) queries (already scaled), keys and values; in the graph, one
    com.microsoft MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, n_head: int) -> Tensor:
        heads = lambda t: t.unflatten(-1, (n_head, -1)).transpose(1, 2)  # noqa: E731
        weights = (heads(q) @ heads(k).transpose(-1, -2)).softmax(dim=-1)
        return (weights @ heads(v)).transpose(1, 2).flatten(2)

    @staticmethod
    def symbolic(g, q, k, v, n_head: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=n_head, scale_f=1.0)
        out.setType(v.type().with_sizes([None, None, v.type().sizes()[-1]]))  # (B, T, H * vo_dim), T free
        return out


class FusedSelfAttention(nn.Module):
    """An encoder block's self-attention for export: the module's own projections (plain or factored)
    around one fused attention node."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        a = self.attn
        q = a.project_query(x).transpose(1, 2).flatten(2)
        k_t, v = a.project_key_value(x)
        return a.out(
            _FusedAttention.apply(q, k_t.permute(0, 3, 1, 2).flatten(2), v.transpose(1, 2).flatten(2), a.n_head)
        )


class EncoderGraph(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, mel: Tensor) -> list[Tensor]:
        return _flatten(self.decoder.cross_kv(self.encoder(mel)))


class DecoderGraph(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.decoder = model.decoder
        self.n_layer = model.dims.n_text_layer

    def forward(self, tokens: Tensor, *caches: Tensor) -> list[Tensor]:
        n = 2 * self.n_layer
        logits, cache = self.decoder.forward_cached(tokens, _pairs(caches[:n]), _pairs(caches[n:]))
        return [logits, *_flatten(cache)]


def prepare_for_export(model: Whisper) -> Whisper:
    """A copy of the model in the layout the graphs want (the original is left as it is)."""
    model = copy.deepcopy(model).eval()
    for block in model.encoder.blocks:
        block.attn = FusedSelfAttention(block.attn)
    if isinstance(model.decoder.token_embedding, TokenEmbedding):
        model.decoder.token_embedding = TransposedTokenEmbedding(model.decoder.token_embedding)
    return model


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict,
    custom_opsets: dict | None = None,
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the graph is checked by tests
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            custom_opsets=custom_opsets,
        )


def export_encoder(model: Whisper, path: Path, dynamic_length: bool = False) -> Path:
    """With `dynamic_length`, the mel input's time axis (and the outputs' audio axis, half as long) is free:
    a model adapted to shorter context runs on each window's own length. Without it the graph is Whisper's
    fixed 3000 frames."""
    dims = model.dims
    mel = torch.zeros(1, dims.n_mels, 2 * dims.n_audio_ctx)
    outputs = cache_names("cross", dims.n_text_layer)
    axes = {"mel": {0: "batch"}} | {name: {0: "batch"} for name in outputs}
    if dynamic_length:
        axes["mel"][2] = "frames"
        for name in outputs:  # keys are stored transposed: their audio axis is the last
            axes[name][3 if "_k_" in name else 2] = "n_audio"
    _export(
        EncoderGraph(prepare_for_export(model)),
        (mel,),
        path,
        ["mel"],
        outputs,
        axes,
        custom_opsets={"com.microsoft": 1},
    )
    return path


def export_decoder(model: Whisper, path: Path) -> Path:
    dims = model.dims
    # Trace with a non-empty cache and two new tokens so that every length stays symbolic. Head widths
    # come from each layer: a compressed model may have factored them to different ranks.
    cache, cross = [], []
    for block in model.decoder.blocks:
        a, c = block.attn, block.cross_attn
        cache += [torch.zeros(1, a.n_head, a.qk_dim, 3), torch.zeros(1, a.n_head, 3, a.vo_dim)]
        cross += [
            torch.zeros(1, c.n_head, c.qk_dim, dims.n_audio_ctx),
            torch.zeros(1, c.n_head, dims.n_audio_ctx, c.vo_dim),
        ]
    tokens = torch.zeros(1, 2, dtype=torch.long)
    self_names, cross_names = cache_names("self", dims.n_text_layer), cache_names("cross", dims.n_text_layer)
    new_names = ["new_" + name for name in self_names]
    # Which axis of keys (transposed) and values grows with the sequence.
    length_axis = lambda name: 3 if "_k_" in name else 2  # noqa: E731
    axes = {"tokens": {0: "batch", 1: "n_new"}, "logits": {0: "batch"}}
    axes |= {n: {0: "batch", length_axis(n): "n_past"} for n in self_names}
    axes |= {n: {0: "batch", length_axis(n): "n_total"} for n in new_names}
    axes |= {n: {0: "batch", length_axis(n): "n_audio"} for n in cross_names}
    _export(
        DecoderGraph(prepare_for_export(model)),
        (tokens, *cache, *cross),
        path,
        ["tokens", *self_names, *cross_names],
        ["logits", *new_names],
        axes,
    )
    return path
