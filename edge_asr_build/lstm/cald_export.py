"""ONNX export of a converted (CALD) encoder with its CTC head as one stateful streaming graph.

    features (T, n_mels), mel_tail, conv_tail, h0, c0, …  ->  log_probs (T / 2, n_symbols), the states after

It is the LSTM-CTC runtime's interface (`edge_asr.backend.OnnxLstmCtc`: a zero state starts an utterance),
so the streaming transcriber, partials, hotwords and the daemon run it unchanged. A chunk goes through the
graph layer by layer: the convolutions, norms, input matrices, output matrices and FFNs are batched over
the chunk's frames; only each block's recurrence is a `Scan` over time, one per block.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_asr_build.lstm.cald import CaldCtc
from edge_asr_build.lstm.export import _init, save_streaming_graph


def state_names(model: CaldCtc) -> list[str]:
    return ["mel_tail", "conv_tail"] + [f"{kind}{i}" for i in range(model.config.n_layer) for kind in ("h", "c")]


def state_shapes(model: CaldCtc) -> dict[str, list[int]]:
    c = model.config
    shapes = {"mel_tail": [1, c.n_mels, 2], "conv_tail": [1, c.n_state, 2]}
    for i, block in enumerate(model.blocks):
        shapes[f"h{i}"] = [1, block.lstm.proj_size or c.hidden[i]]
        shapes[f"c{i}"] = [1, c.hidden[i]]
    return shapes


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


class _Graph:
    def __init__(self):
        self.nodes, self.inits = [], []

    def init(self, name: str, array) -> str:
        self.inits.append(_init(name, np.asarray(array)))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def gelu(self, x: str, name: str) -> str:
        # 0.5 x (1 + erf(x / sqrt 2)): ONNX Runtime fuses this pattern into its Gelu kernel.
        scaled = self.node("Mul", [x, "inv_sqrt2"], f"{name}_s")
        erf = self.node("Erf", [scaled], f"{name}_erf")
        one_plus = self.node("Add", [erf, "one"], f"{name}_1p")
        half = self.node("Mul", [x, "half"], f"{name}_h")
        return self.node("Mul", [half, one_plus], name)

    def linear(self, x: str, layer, name: str) -> str:
        y = self.node("MatMul", [x, self.init(f"{name}.W", _np(layer.weight).T)], f"{name}_mm")
        if layer.bias is None:
            return y
        return self.node("Add", [y, self.init(f"{name}.b", _np(layer.bias))], name)

    def layer_norm(self, x: str, norm, name: str) -> str:
        return self.node(
            "LayerNormalization",
            [x, self.init(f"{name}.g", _np(norm.weight)), self.init(f"{name}.b", _np(norm.bias))],
            name,
            axis=-1,
            epsilon=norm.eps,
        )


def _recurrence(block, i: int) -> onnx.GraphProto:
    """One step of block i's LSTM(P): (h, c, input gates of the step) -> (h', c', h')."""
    g = _Graph()
    lstm = block.lstm
    hidden = lstm.hidden_size
    h, c = f"h{i}_in", f"c{i}_in"
    rec = g.node("MatMul", [h, g.init(f"W_hh{i}", _np(lstm.weight_hh_l0).T)], "rec")
    gates = g.node("Add", ["gates_t", rec], "gates")
    g.nodes.append(
        helper.make_node(
            "Split", [gates, g.init("split", np.array([hidden] * 4, dtype=np.int64))], ["gi", "gf", "gg", "go"], axis=1
        )
    )  # torch's gate order: i, f, g, o
    si, sf = g.node("Sigmoid", ["gi"], "si"), g.node("Sigmoid", ["gf"], "sf")
    tg, so = g.node("Tanh", ["gg"], "tg"), g.node("Sigmoid", ["go"], "so")
    c_new = g.node("Add", [g.node("Mul", [sf, c], "fc"), g.node("Mul", [si, tg], "ig")], f"c{i}_out")
    h_full = g.node("Mul", [so, g.node("Tanh", [c_new], "tc")], "h_full")
    if lstm.proj_size:
        g.node("MatMul", [h_full, g.init(f"W_hr{i}", _np(lstm.weight_hr_l0).T)], f"h{i}_out")
    else:
        g.node("Identity", [h_full], f"h{i}_out")
    g.node("Identity", [f"h{i}_out"], "h_t")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (h, c, "gates_t")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (f"h{i}_out", f"c{i}_out", "h_t")]
    return helper.make_graph(g.nodes, f"block{i}_step", inputs, outputs, initializer=g.inits)


def export_cald(model: CaldCtc, path: str | Path) -> Path:
    """Write the streaming graph of `model` (float32) to `path`."""
    model = model.eval()
    c = model.config
    g = _Graph()
    for name, value in (
        ("inv_sqrt2", 1 / math.sqrt(2)),
        ("one", 1.0),
        ("half", 0.5),
        ("floor", c.mel_floor),
        ("four", 4.0),
        ("quarter", 0.25),
    ):
        g.init(name, np.array(value, dtype=np.float32))
    g.init("axis0", np.array([0], dtype=np.int64))
    g.init("axis1", np.array([1], dtype=np.int64))
    g.init("tail_start", np.array([-2], dtype=np.int64))
    g.init("tail_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    g.init("axis2", np.array([2], dtype=np.int64))

    # features -> Whisper's scale, (1, n_mels, T)
    scaled = g.node(
        "Mul",
        [g.node("Add", [g.node("Max", ["features", "floor"], "floored"), "four"], "shifted"), "quarter"],
        "scaled",
    )
    mel = g.node("Unsqueeze", [g.node("Transpose", [scaled], "mel_t", perm=[1, 0]), "axis0"], "mel")
    x1 = g.node("Concat", ["mel_tail", mel], "conv1_in", axis=2)
    g.node("Slice", [x1, "tail_start", "tail_end", "axis2"], "mel_tail_out")
    conv1 = g.node(
        "Conv",
        [x1, g.init("conv1.W", _np(model.front.conv1.weight)), g.init("conv1.b", _np(model.front.conv1.bias))],
        "conv1",
        kernel_shape=[3],
    )
    y = g.node("Concat", ["conv_tail", g.gelu(conv1, "conv1_g")], "conv2_in", axis=2)
    g.node("Slice", [y, "tail_start", "tail_end", "axis2"], "conv_tail_out")
    conv2 = g.node(
        "Conv",
        [y, g.init("conv2.W", _np(model.front.conv2.weight)), g.init("conv2.b", _np(model.front.conv2.bias))],
        "conv2",
        kernel_shape=[3],
        strides=[2],
    )
    x = g.node("Transpose", [g.node("Squeeze", [g.gelu(conv2, "conv2_g"), "axis0"], "conv2_sq")], "x0", perm=[1, 0])

    for i, block in enumerate(model.blocks):
        h = g.layer_norm(x, block.attn_ln, f"b{i}.attn_ln")
        if block.input_proj is not None:
            h = g.linear(h, block.input_proj, f"b{i}.input_proj")
        lstm = block.lstm
        w_ih = g.init(f"b{i}.W_ih", _np(lstm.weight_ih_l0).T)
        bias = g.init(f"b{i}.b_lstm", _np(lstm.bias_ih_l0) + _np(lstm.bias_hh_l0))
        gates = g.node("Add", [g.node("MatMul", [h, w_ih], f"b{i}.ih"), bias], f"b{i}.gates")
        seq = g.node("Unsqueeze", [gates, "axis1"], f"b{i}.gates_seq")  # (T, 1, 4H): a step is (1, 4H)
        g.nodes.append(
            helper.make_node(
                "Scan",
                [f"h{i}", f"c{i}", seq],
                [f"h{i}_out", f"c{i}_out", f"b{i}.h_seq"],
                body=_recurrence(block, i),
                num_scan_inputs=1,
            )
        )
        h_seq = g.node("Squeeze", [f"b{i}.h_seq", "axis1"], f"b{i}.h")
        m = g.node("Add", [x, g.linear(h_seq, block.out, f"b{i}.out")], f"b{i}.m")
        ffn = g.linear(
            g.gelu(g.linear(g.layer_norm(m, block.mlp_ln, f"b{i}.mlp_ln"), block.mlp[0], f"b{i}.fc1"), f"b{i}.fc1_g"),
            block.mlp[2],
            f"b{i}.fc2",
        )
        x = g.node("Add", [m, ffn], f"x{i + 1}")
    logits = g.linear(g.layer_norm(x, model.ln_post, "ln_post"), model.head, "head")
    g.node("LogSoftmax", [logits], "log_probs", axis=-1)

    shapes = state_shapes(model)
    return save_streaming_graph(
        "cald_ctc", g.nodes, g.inits, c.n_mels, c.n_symbols, {n: shapes[n] for n in state_names(model)}, path
    )
