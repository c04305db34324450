"""LiteRT models of the streaming LSTM-CTC families: acoustic.tflite with the signatures "step" (1 step:
`stack` frames) and "chunk" (CHUNK_STEPS steps), each

    features (steps * stack, n_mels), h_i, c_i -> log_probs (steps, n_symbols), h_i', c_i'

TFLite has static shapes, so a graph is `steps` recurrent steps unrolled with the state in and out. A stream
runs whole chunks and the remainder step by step; the state carries across calls, so the result is the
same as one pass."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from edge_asr_build.bundle.tflite_export import Keywords, convert_signatures, quantize_tflite_int8
from edge_asr_build.lstm.cald import CaldCtc
from edge_asr_build.lstm.cald_export import state_names, state_shapes
from edge_asr_build.lstm.model import LstmCtc

CHUNK_STEPS = 16


def lstm_steps(x: Tensor, lstm: nn.Module, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An LSTM(P) layer over x (steps, n_in) unrolled, the input matrix batched over the steps."""
    w_hh, w_hr = lstm.weight_hh_l0, getattr(lstm, "weight_hr_l0", None)
    input_gates = x @ lstm.weight_ih_l0.T + (lstm.bias_ih_l0 + lstm.bias_hh_l0)
    outputs = []
    for t in range(x.shape[0]):
        gi, gf, gg, go = (input_gates[t : t + 1] + h @ w_hh.T).chunk(4, -1)
        c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
        h = torch.sigmoid(go) * torch.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.T
        outputs.append(h)
    return torch.cat(outputs, 0), h, c


class LstmStepsGraph(nn.Module):
    """`steps` LSTM steps unrolled, with the state in and out: TFLite has no projected LSTM with a state
    that is both an input and an output, and the unrolled cell is a handful of fully connected ops."""

    def __init__(self, model: LstmCtc, steps: int):
        super().__init__()
        self.model, self.steps = model.eval(), steps

    def forward(self, features: Tensor, *state: Tensor) -> dict[str, Tensor]:
        m = self.model
        x = m.stack_frames(features[None])[0]  # (steps, n_input)
        if m.input_proj is not None:
            x = m.input_proj(x)
        new_state = {}
        for i, layer in enumerate(m.layers):
            x, new_state[f"h{i}"], new_state[f"c{i}"] = lstm_steps(x, layer, state[2 * i], state[2 * i + 1])
        return {"log_probs": m.output(x).log_softmax(-1), **new_state}


class CaldStepsGraph(nn.Module):
    """`steps` encoder steps (2 * steps mel frames) of a converted (CALD) model with its state in and out,
    as the ONNX graph computes them (`cald_export`)."""

    def __init__(self, model, steps: int):
        super().__init__()
        self.model, self.steps = model.eval(), steps

    def forward(self, features: Tensor, mel_tail: Tensor, conv_tail: Tensor, *state: Tensor) -> dict[str, Tensor]:
        m = self.model
        x, mel_tail, conv_tail = m.front(m.normalize(features[None]), mel_tail, conv_tail)
        x = x[0]
        new_state = {"mel_tail": mel_tail, "conv_tail": conv_tail}
        for i, block in enumerate(m.blocks):
            h = block.attn_ln(x)
            if block.input_proj is not None:
                h = block.input_proj(h)
            y, new_state[f"h{i}"], new_state[f"c{i}"] = lstm_steps(h, block.lstm, state[2 * i], state[2 * i + 1])
            x = x + block.out(y)
            x = x + block.mlp(block.mlp_ln(x))
        return {"log_probs": m.head(m.ln_post(x)).log_softmax(-1), **new_state}


def export_cald_tflite(model, path: Path, chunk_steps: int = CHUNK_STEPS) -> Path:
    """acoustic.tflite (float32) of a converted model, with the signatures "step" and "chunk"."""
    shapes = state_shapes(model)
    state = {n: torch.zeros(*shapes[n]) for n in state_names(model)}
    names = ["features", *state]
    signatures = []
    for name, steps in (("step", 1), ("chunk", chunk_steps)):
        inputs = {"features": torch.zeros(2 * steps, model.config.n_mels), **state}
        signatures.append((name, Keywords(CaldStepsGraph(model, steps), names), inputs))
    return convert_signatures(signatures, Path(path))


def lstm_state_inputs(model: LstmCtc) -> dict[str, Tensor]:
    c = model.config
    return {
        f"{kind}{i}": torch.zeros(1, c.layer_output(i) if kind == "h" else c.hidden[i])
        for i in range(len(c.hidden))
        for kind in ("h", "c")
    }


def export_lstm_tflite(model: LstmCtc, path: Path, chunk_steps: int = CHUNK_STEPS) -> Path:
    """acoustic.tflite (float32) with the signatures "step" and "chunk"."""
    state = lstm_state_inputs(model)
    names = ["features", *state]
    signatures = []
    for name, steps in (("step", 1), ("chunk", chunk_steps)):
        inputs = {"features": torch.zeros(steps * model.config.stack, model.config.n_mels), **state}
        signatures.append((name, Keywords(LstmStepsGraph(model, steps), names), inputs))
    return convert_signatures(signatures, Path(path))


def add_lstm_tflite(model, staged: Path, work: Path, precision: str) -> dict:
    export = export_cald_tflite if isinstance(model, CaldCtc) else export_lstm_tflite
    path = export(model, work / "acoustic.fp32.tflite")
    target = staged / f"acoustic.{precision}.tflite"
    if precision == "int8":
        quantize_tflite_int8(path, target)
    else:
        path.replace(target)
    return {"graphs": {"acoustic": target.name}, "chunk_steps": CHUNK_STEPS}
