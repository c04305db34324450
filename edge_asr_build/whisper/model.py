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


def _exporting() -> bool:
    """Whether the model is being traced into a graph: TorchScript for ONNX, torch.export for LiteRT."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


class MultiHeadAttention(nn.Module):
    """Attention with tensors kept in head layout: queries and values (B, H, T, head_dim), keys
    transposed (B, H, head_dim, S). In that layout cached keys/values are appended along one axis and used
    without any transpose, which is what keeps a decoding step cheap.

    The query/key head width (`qk_dim`) and the value/output head width (`vo_dim`) are separate: a
    compressed model factors each pair of "product twins" (W_q W_k^T and W_v W_o per head) to its own
    rank. The score scale stays that of the original heads, because the factored product keeps the
    original bilinear form's magnitude.
    """

    factored = False  # set on modules made by the compression pass

    def __init__(self, n_state: int, n_head: int, qk_dim: int | None = None, vo_dim: int | None = None):
        super().__init__()
        head_dim = n_state // n_head
        self.n_head = n_head
        self.qk_dim = qk_dim or head_dim
        self.vo_dim = vo_dim or head_dim
        self.scale = head_dim**-0.5
        self.query = nn.Linear(n_state, n_head * self.qk_dim)
        self.key = nn.Linear(n_state, n_head * self.qk_dim, bias=False)
        self.value = nn.Linear(n_state, n_head * self.vo_dim)
        self.out = nn.Linear(n_head * self.vo_dim, n_state)

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, H * dim) -> (B, H, T, dim)."""
        return x.unflatten(-1, (self.n_head, -1)).transpose(1, 2)

    def project_query(self, x: Tensor) -> Tensor:
        # Whisper scales q and k each by head_dim**-0.25; the whole head_dim**-0.5 on q is the same.
        return self.heads(self.query(x)) * self.scale

    def project_key_value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys transposed (B, H, qk_dim, S) and values (B, H, S, vo_dim)."""
        return self.heads(self.key(x)).transpose(-1, -2), self.heads(self.value(x))

    def attend(self, q: Tensor, k_t: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        if _exporting():  # the written-out math, which the export passes lower or replace op by op
            scores = q @ k_t
            if mask is not None:
                scores = scores + mask
            return self.out((scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2))
        # torch's fused kernel works through the keys in blocks instead of holding every head's T x T scores:
        # a 30 s encoder pass 0.38 -> 0.24 s on 2 threads, the same output to 1e-6 relative.
        attended = F.scaled_dot_product_attention(q, k_t.transpose(-1, -2), v, attn_mask=mask, scale=1.0)
        return self.out(attended.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.attend(self.project_query(x), *self.project_key_value(x), mask)


KeyValue = tuple[Tensor, Tensor]  # (keys transposed (B, H, head_dim, S), values (B, H, S, head_dim))


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

    def forward(self, x: Tensor, cross: KeyValue | None = None, mask: Tensor | None = None) -> Tensor:
        """Without cache: the encoder (no cross, no mask) or teacher-forced decoding."""
        x = x + self.attn(self.attn_ln(x), mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn.attend(self.cross_attn.project_query(self.cross_attn_ln(x)), *cross)
        return x + self.mlp(self.mlp_ln(x))

    def forward_cached(self, x: Tensor, cache: KeyValue, cross: KeyValue, mask: Tensor) -> tuple[Tensor, KeyValue]:
        """Decoder block over new tokens x, after earlier tokens whose keys/values are in `cache`.

        Returns the block output and the cache extended by the new tokens.
        """
        h = self.attn_ln(x)
        new_k_t, new_v = self.attn.project_key_value(h)
        k_t = torch.cat([cache[0], new_k_t], dim=-1)
        v = torch.cat([cache[1], new_v], dim=-2)
        x = x + self.attn.attend(self.attn.project_query(h), k_t, v, mask)
        x = x + self.cross_attn.attend(self.cross_attn.project_query(self.cross_attn_ln(x)), *cross)
        x = x + self.mlp(self.mlp_ln(x))
        return x, (k_t, v)


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

    def cross_kv(self, audio_features: Tensor) -> list[KeyValue]:
        """Cross-attention keys and values of every block.

        They depend on the audio alone, so they are computed once per window, not once per token.
        """
        return [block.cross_attn.project_key_value(audio_features) for block in self.blocks]

    def forward_cached(
        self, tokens: Tensor, cache: list[KeyValue], cross: list[KeyValue]
    ) -> tuple[Tensor, list[KeyValue]]:
        """Decode new tokens (B, T) after the P tokens whose keys/values are in `cache` (one pair per
        block). Returns the logits of the last new token (B, n_vocab) and the caches extended to P + T.
        """
        n_new = tokens.shape[1]
        offset = cache[0][1].shape[2]
        positions = torch.arange(n_new, device=tokens.device) + offset
        x = self.token_embedding.embed(tokens) + self.positional_embedding[positions]
        # Causal mask of the new tokens over all P + T keys: query i sits at absolute position offset + i.
        key_positions = torch.arange(offset + n_new, device=tokens.device)
        mask = torch.where(key_positions[None, :] > positions[:, None], float("-inf"), 0.0)
        new_cache = []
        for block, block_cache, block_cross in zip(self.blocks, cache, cross):
            x, block_cache = block.forward_cached(x, block_cache, block_cross, mask)
            new_cache.append(block_cache)
        return self.token_embedding.logits(self.ln(x[:, -1])), new_cache

    def hidden_states(self, tokens: Tensor, cross: list[KeyValue]) -> list[Tensor]:
        """Teacher-forced (no cache): the residual stream after every block, then the final layer norm's
        output, each (B, T, n_state). What reference matching compares a student with its reference by."""
        n_ctx = tokens.shape[1]
        x = self.token_embedding.embed(tokens) + self.positional_embedding[:n_ctx]
        mask = torch.full((n_ctx, n_ctx), float("-inf"), device=tokens.device).triu_(1)
        states = []
        for block, block_cross in zip(self.blocks, cross):
            x = block(x, block_cross, mask)
            states.append(x)
        return states + [self.ln(x)]

    def forward(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Logits of every position (B, T, n_vocab), without a cache: teacher forcing for training."""
        return self.token_embedding.logits(self.hidden_states(tokens, self.cross_kv(audio_features))[-1])


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

    def empty_cache(self, batch: int = 1) -> list[KeyValue]:
        """The self-attention cache before the first token: zero-length keys and values per block."""
        cache = []
        for block in self.decoder.blocks:
            attn = block.attn
            cache.append(
                (torch.zeros(batch, attn.n_head, attn.qk_dim, 0), torch.zeros(batch, attn.n_head, 0, attn.vo_dim))
            )
        return cache

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
