"""Whisper in PyTorch, written for export and compression rather than for training from scratch.

The parameter names follow openai-whisper's `model.py`, so its checkpoints load as they are. Two things
differ: attention caches are explicit tensors (no forward hooks), which is what an ONNX graph with a KV
cache needs, and every projection is an ordinary `nn.Linear` that a compression pass may swap for a
factored module with the same call signature.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_multilingual(self) -> bool:
        # English-only checkpoints have 51864 tokens; multilingual ones 51865 or more.
        return self.n_vocab >= 51865


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """The encoder's fixed positional embedding (openai-whisper's definition)."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class TokenEmbedding(nn.Module):
    """The token embedding, tied to the output projection onto the vocabulary (n_vocab, n_state)."""

    def __init__(self, n_vocab: int, n_state: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_vocab, n_state))

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight)

    def logits(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scaled dot-product attention of already projected q (B,T,D) over k, v (B,S,D)."""
        n_batch, n_ctx, n_state = q.shape
        head_dim = n_state // self.n_head
        # Whisper scales q and k each by head_dim**-0.25; one scale on the product is the same.
        q = q.view(n_batch, n_ctx, self.n_head, head_dim).transpose(1, 2)
        k = k.view(n_batch, k.shape[1], self.n_head, head_dim).transpose(1, 2)
        v = v.view(n_batch, v.shape[1], self.n_head, head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * (head_dim**-0.5)
        if mask is not None:
            scores = scores + mask
        weights = scores.float().softmax(dim=-1).to(q.dtype)
        return self.out((weights @ v).transpose(1, 2).reshape(n_batch, n_ctx, n_state))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.attend(self.query(x), self.key(x), self.value(x), mask)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        n_mlp = n_state * 4
        self.mlp = nn.Sequential(nn.Linear(n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        """Encoder block: self-attention over the whole sequence, no mask."""
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))

    def forward_cached(
        self, x: Tensor, self_k: Tensor, self_v: Tensor, cross_k: Tensor, cross_v: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decoder block over new tokens x, given the self-attention cache of earlier tokens.

        Returns the block output and the extended self-attention keys and values.
        """
        h = self.attn_ln(x)
        k = torch.cat([self_k, self.attn.key(h)], dim=1)
        v = torch.cat([self_v, self.attn.value(h)], dim=1)
        x = x + self.attn.attend(self.attn.query(h), k, v, mask)
        x = x + self.cross_attn.attend(self.cross_attn.query(self.cross_attn_ln(x)), cross_k, cross_v)
        x = x + self.mlp(self.mlp_ln(x))
        return x, k, v


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 2*n_ctx) -> audio features (B, n_ctx, n_state)."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = TokenEmbedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)]
        )
        self.ln = nn.LayerNorm(n_state)

    def cross_kv(self, audio_features: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of every block, (n_layer, B, n_audio_ctx, n_state) each.

        They depend on the audio alone, so they are computed once per window, not once per token.
        """
        ks = [b.cross_attn.key(audio_features) for b in self.blocks]
        vs = [b.cross_attn.value(audio_features) for b in self.blocks]
        return torch.stack(ks), torch.stack(vs)

    def forward_cached(
        self, tokens: Tensor, self_k: Tensor, self_v: Tensor, cross_k: Tensor, cross_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decode new tokens (B, T) after the P tokens whose keys/values are in self_k/self_v
        (n_layer, B, P, n_state). Returns the logits of the last new token (B, n_vocab) and the
        caches extended to P + T.
        """
        n_new = tokens.shape[1]
        offset = self_k.shape[2]
        positions = torch.arange(n_new, device=tokens.device) + offset
        x = self.token_embedding.embed(tokens) + self.positional_embedding[positions]
        # Causal mask of the new tokens over all P + T keys: query i sits at absolute position offset + i.
        key_positions = torch.arange(offset + n_new, device=tokens.device)
        mask = torch.where(key_positions[None, :] > positions[:, None], float("-inf"), 0.0)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.forward_cached(x, self_k[i], self_v[i], cross_k[i], cross_v[i], mask)
            new_k.append(k)
            new_v.append(v)
        logits = self.token_embedding.logits(self.ln(x[:, -1]))
        return logits, torch.stack(new_k), torch.stack(new_v)

    def forward(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Logits of every position (B, T, n_vocab), without a cache: teacher forcing for training."""
        n_ctx = tokens.shape[1]
        x = self.token_embedding.embed(tokens) + self.positional_embedding[:n_ctx]
        mask = torch.full((n_ctx, n_ctx), float("-inf"), device=tokens.device).triu_(1)
        cross_k, cross_v = self.cross_kv(audio_features)
        for i, block in enumerate(self.blocks):
            h = block.attn_ln(x)
            x = x + block.attn(h, mask)
            x = x + block.cross_attn.attend(block.cross_attn.query(block.cross_attn_ln(x)), cross_k[i], cross_v[i])
            x = x + block.mlp(block.mlp_ln(x))
        return self.token_embedding.logits(self.ln(x))


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        return self.decoder(tokens, self.encoder(mel))

    def empty_cache(self, batch: int = 1) -> tuple[Tensor, Tensor]:
        shape = (self.dims.n_text_layer, batch, 0, self.dims.n_text_state)
        return torch.zeros(shape), torch.zeros(shape)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
