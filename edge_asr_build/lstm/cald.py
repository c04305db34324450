"""Whisper's encoder converted to a causal streaming encoder of LSTM blocks (CALD), with a CTC head.

Whisper's encoder is a convolution front end, sinusoidal positions and residual blocks of
self-attention and a feed-forward network (FFN). Only the self-attention needs the whole window. The
conversion keeps everything else, Whisper's own weights, and replaces each attention sublayer by a
causal recurrent one:

    Whisper block l:   m_l = x_l + Attention(LN1(x_l))            x_{l+1} = m_l + FFN(LN2(m_l))
    converted block:   m_l = x_l + W_out LSTM(W_in LN1(x_l))      x_{l+1} = m_l + FFN(LN2(m_l))

W_in (`input_rank`) is optional: a low-rank factor of the LSTM's input matrix. The LSTM may have a
recurrent projection (LSTMP, `proj`): the joint SVD (`joint_factor`) factors [W_hh; W_out], the two
matrices that read the LSTM's output, into one projection that both share. The explicit positional
embedding is dropped: the first block's LSTM is trained to add what the positions contributed.

The convolution front end streams with a state: Whisper's centered kernels each look one frame ahead, so
an encoder frame is ready two mel frames (20 ms) after its centre, and the converted encoder's output m
matches Whisper's frame m - 1 (output 0 is a lead frame). `cald_train.collate` aligns the teacher's frames so.

Features are the runtime's streaming log-mel (`edge_asr.frontend.frame_log_mel`, log10, floor 1e-10):
the graph clamps them at a fixed floor (Whisper clamps at the window's maximum - 8, which a stream cannot
know) and scales them as Whisper does, (x + 4) / 4.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_asr.ctc import ALPHABET
from edge_asr_build.compression.ranks import Group, allocate_ranks
from edge_asr_build.lstm.lstmp import (
    checkpoint_family,
    copy_factored,
    factor_input,
    input_group,
    joint_group,
    load_checkpoint,
    lstmp_layer,
    save_checkpoint,
    weight_params,
)

FAMILY = "cald-ctc"
# torch's note that its oneDNN kernels lack LSTMP says nothing a user can act on: LSTMP runs on its own kernel.
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")


@dataclass
class CaldConfig:
    n_mels: int = 80
    n_state: int = 384
    n_mlp: int = 1536
    hidden: list[int] = field(default_factory=lambda: [384] * 4)
    proj: list[int] = field(default_factory=lambda: [0] * 4)  # 0: no recurrent projection
    input_rank: list[int] = field(default_factory=lambda: [0] * 4)  # 0: W_ih dense
    mel_floor: float = -6.0  # log10 mel power floor of the streaming features
    alphabet: str = ALPHABET  # CTC symbols, index 0 the blank

    @property
    def n_layer(self) -> int:
        return len(self.hidden)

    @property
    def n_symbols(self) -> int:
        return len(self.alphabet)


class StreamingConvFront(nn.Module):
    """Whisper's two convolutions (kernel 3; the second with stride 2) with their left context carried
    in a state instead of zero padding: chunk after chunk gives what the whole sequence gives."""

    def __init__(self, n_mels: int, n_state: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2)

    def forward(self, mel: Tensor, mel_tail: Tensor, conv_tail: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mel (B, n_mels, T), T even -> (B, T/2, n_state), and the two tails (the last 2 columns of each
        convolution's input) for the next chunk."""
        x = torch.cat([mel_tail, mel], -1)
        y = torch.cat([conv_tail, F.gelu(self.conv1(x))], -1)
        return F.gelu(self.conv2(y)).transpose(1, 2), x[..., -2:], y[..., -2:]


class LstmBlock(nn.Module):
    def __init__(self, n_state: int, n_mlp: int, hidden: int, proj: int, input_rank: int):
        super().__init__()
        self.attn_ln = nn.LayerNorm(n_state)
        self.input_proj = nn.Linear(n_state, input_rank, bias=False) if input_rank else None
        self.lstm = lstmp_layer(input_rank or n_state, hidden, proj)
        self.out = nn.Linear(proj or hidden, n_state)
        self.mlp_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, n_state))

    def mix(self, x: Tensor, state=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """What replaces the attention sublayer: its contribution to the residual stream."""
        h = self.attn_ln(x)
        if self.input_proj is not None:
            h = self.input_proj(h)
        y, state = self.lstm(h, state)
        return self.out(y), state

    def forward(self, x: Tensor, state=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        delta, state = self.mix(x, state)
        x = x + delta
        return x + self.mlp(self.mlp_ln(x)), state


class CaldCtc(nn.Module):
    def __init__(self, config: CaldConfig):
        super().__init__()
        c = self.config = config
        self.front = StreamingConvFront(c.n_mels, c.n_state)
        self.blocks = nn.ModuleList(
            LstmBlock(c.n_state, c.n_mlp, h, p, r) for h, p, r in zip(c.hidden, c.proj, c.input_rank)
        )
        self.ln_post = nn.LayerNorm(c.n_state)
        self.head = nn.Linear(c.n_state, c.n_symbols)

    def normalize(self, log_mel: Tensor) -> Tensor:
        """Streaming log10 mel (B, T, n_mels) -> the scaled (B, n_mels, T) the convolutions read."""
        return (torch.clamp(log_mel, min=self.config.mel_floor).transpose(1, 2) + 4) / 4

    def floor_whisper_mel(self, mel: Tensor) -> Tensor:
        """Whisper's scaled log-mel (B, n_mels, T) with this model's fixed floor applied."""
        return torch.clamp(mel, min=(self.config.mel_floor + 4) / 4)

    def initial_state(self, batch: int = 1) -> list:
        c = self.config
        state = [torch.zeros(batch, c.n_mels, 2), torch.zeros(batch, c.n_state, 2)]
        for block, h in zip(self.blocks, c.hidden):
            width = block.lstm.proj_size or h
            state.append((torch.zeros(1, batch, width), torch.zeros(1, batch, h)))
        return state

    def encode(self, mel: Tensor, state: list | None = None, hidden: bool = False):
        """Scaled mel (B, n_mels, T) -> encoder output (B, T/2, n_state) after ln_post, the new state and,
        with `hidden`, the residual stream entering each block and leaving the last (before ln_post)."""
        state = state or self.initial_state(mel.shape[0])
        x, mel_tail, conv_tail = self.front(mel, state[0], state[1])
        new_state, stream = [mel_tail, conv_tail], []
        for block, s in zip(self.blocks, state[2:]):
            stream.append(x)
            x, s = block(x, s)
            new_state.append(s)
        stream.append(x)
        out = self.ln_post(x)
        return (out, new_state, stream) if hidden else (out, new_state)

    def forward(self, log_mel: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        """Streaming log10 mel (B, T, n_mels), T even -> CTC log-probabilities (B, T/2, n_symbols)."""
        out, state = self.encode(self.normalize(log_mel), state)
        return self.head(out).log_softmax(-1), state


# --- from Whisper ---------------------------------------------------------------------------------------------


def from_whisper(encoder, config: CaldConfig | None = None) -> CaldCtc:
    """A converted encoder with Whisper's convolutions, norms and FFNs; new LSTMs and head."""
    c = config or CaldConfig(
        n_mels=encoder.conv1.in_channels,
        n_state=encoder.conv1.out_channels,
        n_mlp=encoder.blocks[0].mlp[0].out_features,
        hidden=[encoder.conv1.out_channels] * len(encoder.blocks),
        proj=[0] * len(encoder.blocks),
        input_rank=[0] * len(encoder.blocks),
    )
    model = CaldCtc(c)
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            getattr(model.front, name).load_state_dict(getattr(encoder, name).state_dict())
        for student, teacher in zip(model.blocks, encoder.blocks):
            student.attn_ln.load_state_dict(teacher.attn_ln.state_dict())
            student.mlp_ln.load_state_dict(teacher.mlp_ln.state_dict())
            student.mlp.load_state_dict(teacher.mlp.state_dict())
            student.out.weight.mul_(0.1)  # a new block starts close to "no attention"
            student.out.bias.zero_()
        model.ln_post.load_state_dict(encoder.ln_post.state_dict())
    return model


@torch.no_grad()
def teacher_stream(encoder, mel: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Whisper's residual stream on scaled mel (B, n_mels, T): the input of every block and the output of
    the last (x_0 … x_L), and each block's state after its attention (m_0 … m_{L-1})."""
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.positional_embedding[: x.shape[1]]
    xs, ms = [], []
    for block in encoder.blocks:
        xs.append(x)
        m = x + block.attn(block.attn_ln(x))
        ms.append(m)
        x = m + block.mlp(block.mlp_ln(m))
    xs.append(x)
    return xs, ms


def lstm_matrix_params(model: CaldCtc) -> int:
    """Parameters of what replaced attention: every W_ih, W_hh, projection and W_out (and input factors)."""
    total = 0
    for block in model.blocks:
        total += weight_params(block.lstm) + block.out.weight.numel()
        if block.input_proj is not None:
            total += block.input_proj.weight.numel()
    return total


# --- joint low-rank factorization ----------------------------------------------------------------------------


def factor_groups(model: CaldCtc) -> list[Group]:
    """Per block: the input matrix W_ih alone, and [W_hh; W_out], which both read the LSTM's output."""
    groups = []
    for i, block in enumerate(model.blocks):
        if block.lstm.proj_size or block.input_proj is not None:
            raise ValueError("the model is already factored; factor the unfactored model")
        groups.append(input_group(f"input{i}", block.lstm.weight_ih_l0))
        groups.append(joint_group(f"block{i}", block.lstm.weight_hh_l0, block.out.weight, block.lstm.hidden_size))
    return groups


def joint_factor(model: CaldCtc, ranks: dict[str, int | None]) -> CaldCtc:
    """A copy whose block i keeps rank ranks[f"block{i}"] of [W_hh; W_out] (an LSTMP: P = V_rᵀ, [A_hh;
    A_out] = U_r S_r) and rank ranks[f"input{i}"] of W_ih (W_ih = (U_q S_q) V_qᵀ). Absent or None: dense.
    At full rank the products are the original matrices, so the outputs are reproduced to rounding."""
    c = model.config
    proj = [ranks.get(f"block{i}") or 0 for i in range(c.n_layer)]
    input_rank = [ranks.get(f"input{i}") or 0 for i in range(c.n_layer)]
    student = CaldCtc(
        CaldConfig(c.n_mels, c.n_state, c.n_mlp, list(c.hidden), proj, input_rank, c.mel_floor, c.alphabet)
    )
    state = {k: v for k, v in model.state_dict().items() if ".lstm." not in k and ".out." not in k}
    student.load_state_dict(state, strict=False)
    with torch.no_grad():
        for i, (src, dst) in enumerate(zip(model.blocks, student.blocks)):
            dst.out.bias.copy_(src.out.bias)
            w_ih = src.lstm.weight_ih_l0.detach()
            if q := input_rank[i]:
                w_ih, projection = factor_input(w_ih, q)
                dst.input_proj.weight.copy_(projection)
            dst.lstm.weight_ih_l0.copy_(w_ih)
            dst.out.weight.copy_(copy_factored(src.lstm, dst.lstm, src.out.weight, proj[i]))
    return student


def compress_cald(model: CaldCtc, ratio: float) -> tuple[CaldCtc, list[Group]]:
    """Factor `model` so that its LSTM matrices (W_ih, W_hh, W_out) keep `ratio` of their parameters,
    ranks allocated across blocks by energy."""
    groups = factor_groups(model)
    allocate_ranks(groups, budget=int(ratio * lstm_matrix_params(model)))
    return joint_factor(model, {g.name: g.rank for g in groups}), groups


# --- checkpoints (lstmp.save_checkpoint) ------------------------------------------------------------------


def save_cald(model: CaldCtc, path: str | Path, extra: dict | None = None) -> Path:
    return save_checkpoint(model, path, FAMILY, extra)


def is_cald_checkpoint(path: str | Path) -> bool:
    return checkpoint_family(path) == FAMILY


def load_cald(path: str | Path) -> tuple[CaldCtc, dict]:
    return load_checkpoint(path, FAMILY, lambda config: CaldCtc(CaldConfig(**config)), "a converted (CALD)")
