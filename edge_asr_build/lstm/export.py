"""ONNX export of an LSTM-CTC model as one stateful streaming graph.

    features (T, n_mels), h_0, c_0, …, h_{L-1}, c_{L-1}  ->  log_probs (T // stack, n_symbols), h_0', c_0', …

The graph is written by hand with `onnx.helper`: ONNX's LSTM operator has no recurrent projection, and an
exporter would unroll the time loop. Here time is one `Scan`: its body runs every layer for one step.
What does not depend on the previous step stays outside, batched over all T steps: normalization, frame
stacking, the first layer's input matrix, and the output layer. Each later layer multiplies [x_t, h_t]
by one stacked matrix, so that a step is a handful of operators per layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_asr_build.lstm.model import LstmCtc

OPSET = 17
IR_VERSION = 8  # what ONNX Runtime 1.14 and later read: older runtimes on devices


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def state_names(n_layers: int) -> list[str]:
    return [f"{kind}{i}" for i in range(n_layers) for kind in ("h", "c")]


def _weights(model: LstmCtc) -> list[dict[str, np.ndarray]]:
    layers = []
    for layer in model.layers:
        p = {name: t.detach().float().numpy() for name, t in layer.named_parameters()}
        p["bias"] = p["bias_ih_l0"] + p["bias_hh_l0"]  # ONNX needs one: the gates only see their sum
        layers.append(p)
    return layers


def _step_body(model: LstmCtc, weights: list[dict[str, np.ndarray]]) -> onnx.GraphProto:
    """One time step of every layer: (h_i, c_i for all i, first-layer input gates) -> (new states, top output)."""
    nodes, inits = [], []
    names = state_names(len(model.layers))
    inputs = [helper.make_tensor_value_info(f"{n}_in", TensorProto.FLOAT, None) for n in names]
    inputs.append(helper.make_tensor_value_info("gates0_t", TensorProto.FLOAT, None))
    outputs = []
    x = None
    for i, (layer, w) in enumerate(zip(model.layers, weights)):
        hidden = layer.hidden_size
        h, c = f"h{i}_in", f"c{i}_in"
        if i == 0:
            inits.append(_init("W_hh0", w["weight_hh_l0"].T))
            nodes += [
                helper.make_node("MatMul", [h, "W_hh0"], ["rec0"]),
                helper.make_node("Add", ["gates0_t", "rec0"], ["gates0"]),
            ]
        else:
            inits += [
                _init(f"W_cat{i}", np.concatenate([w["weight_ih_l0"].T, w["weight_hh_l0"].T])),
                _init(f"b{i}", w["bias"]),
            ]
            nodes += [
                helper.make_node("Concat", [x, h], [f"xh{i}"], axis=1),
                helper.make_node("MatMul", [f"xh{i}", f"W_cat{i}"], [f"mm{i}"]),
                helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"gates{i}"]),
            ]
        inits.append(_init(f"split{i}", np.array([hidden] * 4, dtype=np.int64)))
        gi, gf, gg, go = (f"{g}{i}" for g in ("gi", "gf", "gg", "go"))
        nodes += [
            helper.make_node("Split", [f"gates{i}", f"split{i}"], [gi, gf, gg, go], axis=1),  # torch order i, f, g, o
            helper.make_node("Sigmoid", [gi], [f"si{i}"]),
            helper.make_node("Sigmoid", [gf], [f"sf{i}"]),
            helper.make_node("Tanh", [gg], [f"tg{i}"]),
            helper.make_node("Sigmoid", [go], [f"so{i}"]),
            helper.make_node("Mul", [f"sf{i}", c], [f"fc{i}"]),
            helper.make_node("Mul", [f"si{i}", f"tg{i}"], [f"ig{i}"]),
            helper.make_node("Add", [f"fc{i}", f"ig{i}"], [f"c{i}_out"]),
            helper.make_node("Tanh", [f"c{i}_out"], [f"tc{i}"]),
        ]
        if layer.proj_size:
            inits.append(_init(f"W_hr{i}", w["weight_hr_l0"].T))
            nodes += [
                helper.make_node("Mul", [f"so{i}", f"tc{i}"], [f"hf{i}"]),
                helper.make_node("MatMul", [f"hf{i}", f"W_hr{i}"], [f"h{i}_out"]),
            ]
        else:
            nodes.append(helper.make_node("Mul", [f"so{i}", f"tc{i}"], [f"h{i}_out"]))
        outputs += [f"h{i}_out", f"c{i}_out"]
        x = f"h{i}_out"
    nodes.append(helper.make_node("Identity", [x], ["top_t"]))
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs + ["top_t"]]
    return helper.make_graph(nodes, "lstm_step", inputs, outs, initializer=inits)


def export_lstm(model: LstmCtc, path: str | Path) -> Path:
    """Write the streaming graph of `model` (float32) to `path`."""
    model = model.eval()
    c = model.config
    weights = _weights(model)
    names = state_names(len(model.layers))
    widths = {f"h{i}": model.config.layer_output(i) for i in range(len(model.layers))}
    widths |= {f"c{i}": h for i, h in enumerate(c.hidden)}
    mean, std = model.mean.numpy(), model.std.numpy()
    inits = [
        _init("mean", mean.astype(np.float32)),
        _init("inv_std", (1 / std).astype(np.float32)),
        _init("stacked_shape", np.array([-1, c.n_input], dtype=np.int64)),
        _init("W_ih0", weights[0]["weight_ih_l0"].T),
        _init("b0", weights[0]["bias"]),
        _init("axis1", np.array([1], dtype=np.int64)),
        _init("W_out", model.output.weight.detach().numpy().T),
        _init("b_out", model.output.bias.detach().numpy()),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "inv_std"], ["normalized"]),
        helper.make_node("Reshape", ["normalized", "stacked_shape"], ["stacked"]),
    ]
    x = "stacked"
    if model.input_proj is not None:
        inits.append(_init("W_in", model.input_proj.weight.detach().numpy().T))
        nodes.append(helper.make_node("MatMul", [x, "W_in"], ["projected"]))
        x = "projected"
    nodes += [
        helper.make_node("MatMul", [x, "W_ih0"], ["input_gates"]),
        helper.make_node("Add", ["input_gates", "b0"], ["gates0_all"]),
        helper.make_node("Unsqueeze", ["gates0_all", "axis1"], ["gates0_seq"]),  # (T, 1, 4H): a step is (1, 4H)
        helper.make_node(
            "Scan",
            names + ["gates0_seq"],
            [f"{n}_out" for n in names] + ["top_seq"],
            body=_step_body(model, weights),
            num_scan_inputs=1,
        ),
        helper.make_node("Squeeze", ["top_seq", "axis1"], ["top"]),
        helper.make_node("MatMul", ["top", "W_out"], ["logits_mm"]),
        helper.make_node("Add", ["logits_mm", "b_out"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
    ]
    return save_streaming_graph(
        "lstm_ctc", nodes, inits, c.n_mels, c.n_symbols, {n: [1, widths[n]] for n in names}, path
    )


def save_streaming_graph(
    name: str,
    nodes: list,
    inits: list,
    n_mels: int,
    n_symbols: int,
    state_shapes: dict[str, list[int]],
    path: str | Path,
) -> Path:
    """The streaming interface `edge_asr.backend.OnnxLstmCtc` runs: features (frames, n_mels) and each
    state in, log_probs (steps, n_symbols) and each state as NAME_out; checked and written to `path`."""
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["frames", n_mels])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in state_shapes.items()]
    outputs = [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["steps", n_symbols])]
    outputs += [
        helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, shape) for n, shape in state_shapes.items()
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-asr", ir_version=IR_VERSION
    )
    onnx.checker.check_model(onnx_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))
    return path
