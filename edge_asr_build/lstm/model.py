"""A streaming acoustic model: unidirectional stacked LSTM over stacked log-mel frames, CTC over characters.

Input: log-mel frames (10 ms hop, the runtime's `frame_log_mel`), normalized by the training set's
mean and deviation, then `stack` frames side by side, so that the LSTM steps every 30 ms. Output: per step,
log-probabilities over `ALPHABET` (index 0 the CTC blank).

Compression (`joint_factor`) replaces each layer's output h_l by a low-rank projection p_l = P_l h_l that
both the layer's own recurrence and the next layer (or, after the last layer, the output) read: one SVD of
[W_hh(l); W_ih(l+1)] gives P_l and both new matrices. That is an LSTM with a recurrent projection (LSTMP),
which `nn.LSTM(proj_size=r)` computes, so a factored model trains as fast as a plain one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from edge_asr.ctc import ALPHABET
from edge_asr_build.compression.ranks import Group, allocate_ranks


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


class FullRankLSTMP(nn.Module):
    """One LSTM layer with a recurrent projection as wide as the hidden state. nn.LSTM refuses proj_size ==
    hidden_size, yet that is the full-rank factorization: this loop computes it, for checks only."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size, self.proj_size = input_size, hidden_size, hidden_size
        h = hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.zeros(4 * h, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.zeros(4 * h, h))
        self.bias_ih_l0 = nn.Parameter(torch.zeros(4 * h))
        self.bias_hh_l0 = nn.Parameter(torch.zeros(4 * h))
        self.weight_hr_l0 = nn.Parameter(torch.zeros(h, h))

    def forward(self, x: Tensor, state=None):
        b = x.shape[0]
        h, c = state if state is not None else (x.new_zeros(1, b, self.hidden_size),) * 2
        h, c = h[0], c[0]
        outputs = []
        for t in range(x.shape[1]):
            i, f, g, o = (
                x[:, t] @ self.weight_ih_l0.T + h @ self.weight_hh_l0.T + self.bias_ih_l0 + self.bias_hh_l0
            ).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = (torch.sigmoid(o) * torch.tanh(c)) @ self.weight_hr_l0.T
            outputs.append(h)
        return torch.stack(outputs, 1), (h[None], c[None])


def _lstm_layer(n_in: int, hidden: int, proj: int) -> nn.Module:
    if proj >= hidden:
        return FullRankLSTMP(n_in, hidden)
    return nn.LSTM(n_in, hidden, proj_size=proj, batch_first=True)


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
            _lstm_layer(sizes[i], h, p) for i, (h, p) in enumerate(zip(config.hidden, config.proj))
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
    for layer in model.layers:
        total += sum(p.numel() for name, p in layer.named_parameters() if name.startswith("weight"))
    return total + model.output.weight.numel()


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
    groups = []
    if input_rank:
        w = model.layers[0].weight_ih_l0.detach().double()
        s = torch.linalg.svdvals(w).numpy()
        n_out, n_in = w.shape
        groups.append(Group("input", "linear", s**2, n_in + n_out, n_in * n_out, n_in * n_out // (n_in + n_out)))
    for i, layer in enumerate(model.layers):
        w_hh, w_next = _reader_weights(model, i)
        stacked = torch.cat([w_hh, w_next]).double()
        s = torch.linalg.svdvals(stacked).numpy()
        unit = stacked.shape[0] + stacked.shape[1]  # a column of [A_hh; A_next] and a row of P
        groups.append(Group(f"layer{i}", "joint", s**2, unit, stacked.numel(), layer.hidden_size))
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
            u, s, vh = torch.linalg.svd(w_ih0.double(), full_matrices=False)
            student.layers[0].weight_ih_l0.copy_((u[:, :input_rank] * s[:input_rank]).float())
            student.input_proj.weight.copy_(vh[:input_rank].float())
        else:
            student.layers[0].weight_ih_l0.copy_(w_ih0)
        for i in range(n_layers):
            src, dst = model.layers[i], student.layers[i]
            dst.bias_ih_l0.copy_(src.bias_ih_l0)
            dst.bias_hh_l0.copy_(src.bias_hh_l0)
            w_hh, w_next = _reader_weights(model, i)
            if r := proj[i]:
                u, s, vh = torch.linalg.svd(torch.cat([w_hh, w_next]).double(), full_matrices=False)
                a = (u[:, :r] * s[:r]).float()
                dst.weight_hr_l0.copy_(vh[:r].float())
                w_hh, w_next = a[: len(w_hh)], a[len(w_hh) :]
            dst.weight_hh_l0.copy_(w_hh)
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


# --- checkpoints: safetensors weights + a JSON description, never pickle ------------------------------------


def save_lstm(model: LstmCtc, path: str | Path, extra: dict | None = None) -> Path:
    """Write `path` (.safetensors) and its description (.json); returns the JSON's path."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    meta = {"family": "lstm-ctc", "config": asdict(model.config), "alphabet": ALPHABET} | (extra or {})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path.with_suffix(".json")


def is_lstm_checkpoint(path: str | Path) -> bool:
    description = Path(path).with_suffix(".json")
    try:
        return json.loads(description.read_text()).get("family") == "lstm-ctc"
    except (OSError, json.JSONDecodeError):
        return False


def load_lstm(path: str | Path) -> tuple[LstmCtc, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("family") != "lstm-ctc":
        raise ValueError(f"{path}: not an LSTM-CTC checkpoint")
    model = LstmCtc(LstmConfig(**meta["config"]))
    model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    return model.eval(), meta
