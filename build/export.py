"""Export pass: a `Whisper` module to two ONNX graphs that a torch-free runtime can drive.

  encoder.onnx  mel (B, n_mels, 3000) -> cross_k, cross_v (n_layer, B, 1500, n_state)
      The audio encoder plus every decoder layer's cross-attention key/value projection: those depend on
      the audio alone, so they are computed once per window, not once per token.
  decoder.onnx  tokens (B, T), self_k, self_v (n_layer, B, P, n_state), cross_k, cross_v
                -> logits (B, n_vocab) of the last token, self_k, self_v extended to P + T
      Incremental decoding with an explicit self-attention KV cache; P = 0 on the first call.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .whisper_model import TokenEmbedding, Whisper

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


class EncoderGraph(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder.cross_kv(self.encoder(mel))


class DecoderGraph(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens, self_k, self_v, cross_k, cross_v):
        return self.decoder.forward_cached(tokens, self_k, self_v, cross_k, cross_v)


def prepare_for_export(model: Whisper) -> Whisper:
    """A copy of the model in the layout the graphs want (the original is left as it is)."""
    model = copy.deepcopy(model).eval()
    if isinstance(model.decoder.token_embedding, TokenEmbedding):
        model.decoder.token_embedding = TransposedTokenEmbedding(model.decoder.token_embedding)
    return model


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the graph is checked by tests
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )


def export_encoder(model: Whisper, path: Path) -> Path:
    dims = model.dims
    mel = torch.zeros(1, dims.n_mels, 2 * dims.n_audio_ctx)
    _export(
        EncoderGraph(prepare_for_export(model)), (mel,), path, ["mel"], ["cross_k", "cross_v"],
        {"mel": {0: "batch"}, "cross_k": {1: "batch"}, "cross_v": {1: "batch"}},
    )
    return path


def export_decoder(model: Whisper, path: Path) -> Path:
    dims = model.dims
    # Trace with a non-empty cache and two new tokens so that every length stays symbolic.
    cache = torch.zeros(dims.n_text_layer, 1, 3, dims.n_text_state)
    cross = torch.zeros(dims.n_text_layer, 1, dims.n_audio_ctx, dims.n_text_state)
    tokens = torch.zeros(1, 2, dtype=torch.long)
    _export(
        DecoderGraph(prepare_for_export(model)), (tokens, cache, cache, cross, cross), path,
        ["tokens", "self_k", "self_v", "cross_k", "cross_v"], ["logits", "new_self_k", "new_self_v"],
        {
            "tokens": {0: "batch", 1: "n_new"},
            "self_k": {1: "batch", 2: "n_past"},
            "self_v": {1: "batch", 2: "n_past"},
            "cross_k": {1: "batch", 2: "n_audio"},
            "cross_v": {1: "batch", 2: "n_audio"},
            "logits": {0: "batch"},
            "new_self_k": {1: "batch", 2: "n_total"},
            "new_self_v": {1: "batch", 2: "n_total"},
        },
    )
    return path
