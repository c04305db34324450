"""LSTM layers with a recurrent projection (LSTMP), their joint low-rank factorization, and checkpoint I/O:
what both LSTM families (`model`, trained from scratch; `cald`, converted from Whisper) are made of.

An LSTM's output h feeds two matrices: its own recurrence W_hh, and the matrix that reads it next (the next
layer's W_ih, the output layer, or a block's W_out). One SVD of the two stacked,

    [W_hh; W_reader] = U S Vᵀ  ->  P = V_rᵀ (the projection),  [A_hh; A_reader] = U_r S_r,

replaces h by p = P h, which both read: an LSTMP, which `nn.LSTM(proj_size=r)` computes, so a factored
model trains as fast as a plain one. An input matrix may be factored alone: W_ih = (U_q S_q) V_qᵀ. At full
rank the products are the original matrices.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from edge_asr_build.compression.ranks import Group


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


def lstmp_layer(n_in: int, hidden: int, proj: int) -> nn.Module:
    """One batch-first LSTM layer; `proj` > 0 gives it a recurrent projection of that width."""
    if proj >= hidden:
        return FullRankLSTMP(n_in, hidden)
    return nn.LSTM(n_in, hidden, proj_size=proj, batch_first=True)


def weight_params(layer: nn.Module) -> int:
    """Parameters in a layer's matrices (W_ih, W_hh and the projection; biases aside)."""
    return sum(p.numel() for name, p in layer.named_parameters() if name.startswith("weight"))


# --- factorization ---------------------------------------------------------------------------------------------


def input_group(name: str, w_ih: Tensor) -> Group:
    """The rank-allocation group of an input matrix factored alone."""
    w = w_ih.detach().double()
    n_out, n_in = w.shape
    return Group(
        name, "linear", torch.linalg.svdvals(w).numpy() ** 2, n_in + n_out, n_in * n_out, n_in * n_out // (n_in + n_out)
    )


def joint_group(name: str, w_hh: Tensor, w_reader: Tensor, hidden: int) -> Group:
    """The group of [W_hh; W_reader], which share one projection: a unit is a column of both and a row of P."""
    stacked = torch.cat([w_hh.detach(), w_reader.detach()]).double()
    s = torch.linalg.svdvals(stacked).numpy()
    return Group(name, "joint", s**2, stacked.shape[0] + stacked.shape[1], stacked.numel(), hidden)


def factor_input(w_ih: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """W_ih ≈ A V at `rank`: (A = U_q S_q, the layer's new W_ih; V = V_qᵀ, the input projection)."""
    u, s, vh = torch.linalg.svd(w_ih.detach().double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


def factor_joint(w_hh: Tensor, w_reader: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """[W_hh; W_reader] ≈ [A_hh; A_reader] P at `rank`: (P, A_hh, A_reader)."""
    u, s, vh = torch.linalg.svd(torch.cat([w_hh.detach(), w_reader.detach()]).double(), full_matrices=False)
    a = (u[:, :rank] * s[:rank]).float()
    return vh[:rank].float(), a[: len(w_hh)], a[len(w_hh) :]


def copy_factored(src: nn.Module, dst: nn.Module, w_reader: Tensor, rank: int) -> Tensor:
    """Copy LSTM layer `src` into `dst` (biases, W_hh, and W_ih unless the caller factors it), with [W_hh;
    W_reader] factored at `rank` (0: dense); returns the reader's new matrix."""
    with torch.no_grad():
        dst.bias_ih_l0.copy_(src.bias_ih_l0)
        dst.bias_hh_l0.copy_(src.bias_hh_l0)
        w_hh, w_reader = src.weight_hh_l0.detach(), w_reader.detach()
        if rank:
            projection, w_hh, w_reader = factor_joint(w_hh, w_reader, rank)
            dst.weight_hr_l0.copy_(projection)
        dst.weight_hh_l0.copy_(w_hh)
    return w_reader


# --- checkpoints: safetensors weights + a JSON description, never pickle ------------------------------------


def save_checkpoint(model: nn.Module, path: str | Path, family: str, extra: dict | None = None) -> Path:
    """Write `path` (.safetensors) and its description (.json: family, the model's config, `extra`); returns
    the JSON's path."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    meta = {"family": family, "config": asdict(model.config)} | (extra or {})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path.with_suffix(".json")


def checkpoint_family(path: str | Path) -> str | None:
    """The family a checkpoint's description names; None if it has none or cannot be read."""
    try:
        return json.loads(Path(path).with_suffix(".json").read_text()).get("family")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_checkpoint(path: str | Path, family: str, build, what: str) -> tuple[nn.Module, dict]:
    """The model `build(config dict)` makes, with the weights of checkpoint `path` of `family` (`what`, in
    words); and its description."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("family") != family:
        raise ValueError(f"{path}: not {what} checkpoint")
    model = build(meta["config"])
    model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    return model.eval(), meta
