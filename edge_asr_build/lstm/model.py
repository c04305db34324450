"""A streaming acoustic model: unidirectional stacked LSTM over stacked log-mel frames, CTC over characters.

Input: log-mel frames (10 ms hop, the runtime's `frame_log_mel`), normalized by the training set's
mean and deviation, then `stack` frames side by side, so that the LSTM steps every 30 ms. Output: per step,
log-probabilities over `ALPHABET` (index 0 the CTC blank).

Compression (`joint_factor`) replaces each layer's output h_l by a low-rank projection p_l = P_l h_l that
both the layer's own recurrence and the next layer (or, after the last layer, the output) read: one SVD of
[W_hh(l); W_ih(l+1)] gives P_l and both new matrices (an LSTMP; see `lstmp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
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

FAMILY = "lstm-ctc"


@dataclass
class LstmConfig:
    n_mels: int = 80
    stack: int = 3
    hidden: list[int] = field(default_factory=lambda: [320, 320, 320])
    proj: list[int] = field(default_factory=lambda: [0, 0, 0])  # 0: h_l is the full hidden state
    input_rank: int = 0  # 0: W_ih of the first layer is dense
    n_symbols: int = len(ALPHABET)

    @property
    def n_input(self) -> int:
        return self.n_mels * self.stack

    def layer_output(self, i: int) -> int:
        return self.proj[i] or self.hidden[i]


class LstmCtc(nn.Module):
    def __init__(self, config: LstmConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.n_mels))
        self.register_buffer("std", torch.ones(config.n_mels))
        n_in = config.n_input
        self.input_proj = nn.Linear(n_in, config.input_rank, bias=False) if config.input_rank else None
        sizes = [config.input_rank or n_in] + [config.layer_output(i) for i in range(len(config.hidden))]
        self.layers = nn.ModuleList(
            lstmp_layer(sizes[i], h, p) for i, (h, p) in enumerate(zip(config.hidden, config.proj))
        )
        self.output = nn.Linear(sizes[-1], config.n_symbols)

    def stack_frames(self, features: Tensor) -> Tensor:
        """(B, T, n_mels) normalized and stacked -> (B, T // stack, n_mels * stack); leftover frames wait."""
        b, t, n = features.shape
        t -= t % self.config.stack
        x = (features[:, :t] - self.mean) / self.std
        return x.reshape(b, t // self.config.stack, n * self.config.stack)

    def forward(
        self, features: Tensor, state: list[tuple[Tensor, Tensor]] | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Log-probabilities (B, T // stack, n_symbols) and the state after the last step.

        `lengths` (in steps) pack a padded batch, so that padding never flows into a state."""
        x = self.stack_frames(features)
        if self.input_proj is not None:
            x = self.input_proj(x)
        state = state or [None] * len(self.layers)
        n_steps = x.shape[1]
        if lengths is not None:  # packed once: every layer reads and writes the packed sequence
            x = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        new_state = []
        for layer, s in zip(self.layers, state):
            x, s = layer(x, s)
            new_state.append(s)
        if lengths is not None:
            x = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=n_steps)[0]
        return self.output(x).log_softmax(-1), new_state

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(np.maximum(std, 1e-3), dtype=torch.float32))


def lstm_matrix_params(model: LstmCtc) -> int:
    """Parameters in the matrices compression acts on: every W_ih, W_hh and projection (the first layer's
    input factor included), and the output matrix, which the last layer's projection also feeds."""
    total = model.input_proj.weight.numel() if model.input_proj is not None else 0
    return total + sum(weight_params(layer) for layer in model.layers) + model.output.weight.numel()


# --- joint low-rank factorization ----------------------------------------------------------------------------


def _reader_weights(model: LstmCtc, i: int) -> tuple[Tensor, Tensor]:
    """(W_hh of layer i, the matrix that reads layer i's output next): both act on h_i."""
    layer = model.layers[i]
    if layer.proj_size:
        raise ValueError("the model is already factored; factor the uncompressed model")
    nxt = model.layers[i + 1].weight_ih_l0 if i + 1 < len(model.layers) else model.output.weight
    return layer.weight_hh_l0.detach(), nxt.detach()


def factor_groups(model: LstmCtc, input_rank: bool = True) -> list[Group]:
    """One group per layer (its recurrence and its reader share a rank), and the first layer's input."""
    groups = [input_group("input", model.layers[0].weight_ih_l0)] if input_rank else []
    for i, layer in enumerate(model.layers):
        groups.append(joint_group(f"layer{i}", *_reader_weights(model, i), layer.hidden_size))
    return groups


def joint_factor(model: LstmCtc, ranks: dict[str, int | None]) -> LstmCtc:
    """A new model whose layer i keeps rank ranks[f"layer{i}"] of [W_hh(i); W_next(i)] (absent or None:
    dense), and whose first-layer input keeps rank ranks["input"] (absent or None: dense).

    [W_hh; W_next] = U S Vᵀ  ->  P = V_rᵀ (the projection), [A_hh; A_next] = U_r S_r. At full rank the
    products are the original matrices, so the outputs are reproduced to rounding."""
    c = model.config
    n_layers = len(c.hidden)
    proj = [ranks.get(f"layer{i}") or 0 for i in range(n_layers)]
    input_rank = ranks.get("input") or 0
    student = LstmCtc(LstmConfig(c.n_mels, c.stack, list(c.hidden), proj, input_rank, c.n_symbols))
    student.mean.copy_(model.mean)
    student.std.copy_(model.std)
    with torch.no_grad():
        w_ih0 = model.layers[0].weight_ih_l0.detach()
        if input_rank:
            w_ih0, projection = factor_input(w_ih0, input_rank)
            student.input_proj.weight.copy_(projection)
        student.layers[0].weight_ih_l0.copy_(w_ih0)
        for i in range(n_layers):
            w_next = copy_factored(model.layers[i], student.layers[i], _reader_weights(model, i)[1], proj[i])
            (student.layers[i + 1].weight_ih_l0 if i + 1 < n_layers else student.output.weight).copy_(w_next)
        student.output.bias.copy_(model.output.bias)
    return student


def compress_lstm(
    model: LstmCtc, ratio: float | None = None, energy: float | None = None, factor_input: bool = True
) -> tuple[LstmCtc, list[Group]]:
    """Factor `model` so that its matrices keep `ratio` of their parameters (or `energy` of each group's
    spectrum), ranks allocated across layers by energy."""
    groups = factor_groups(model, factor_input)
    fixed = lstm_matrix_params(model) - sum(g.dense_cost for g in groups)  # the output bias is not counted
    budget = None if ratio is None else int(ratio * lstm_matrix_params(model)) - fixed
    allocate_ranks(groups, budget=budget, energy=energy)
    ranks = {g.name: g.rank for g in groups}
    return joint_factor(model, ranks), groups


# --- checkpoints (lstmp.save_checkpoint) ------------------------------------------------------------------


def save_lstm(model: LstmCtc, path: str | Path, extra: dict | None = None) -> Path:
    """Write `path` (.safetensors) and its description (.json); returns the JSON's path."""
    return save_checkpoint(model, path, FAMILY, {"alphabet": ALPHABET} | (extra or {}))


def is_lstm_checkpoint(path: str | Path) -> bool:
    return checkpoint_family(path) == FAMILY


def load_lstm(path: str | Path) -> tuple[LstmCtc, dict]:
    return load_checkpoint(path, FAMILY, lambda config: LstmCtc(LstmConfig(**config)), "an LSTM-CTC")
