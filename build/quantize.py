"""Quantize pass: int8 weights for an exported ONNX graph, with ONNX Runtime's own quantizers.

Most MatMul weights become int8 per output channel with activations quantized on the fly, one scale
per tensor (`quantize_dynamic`): the fastest int8 path on CPUs. The token embedding's Gather is
quantized too, so the tied vocabulary matrix is stored once, in int8.

The second feed-forward projection (fc2) is the exception. Its input, the GELU output, has the widest
range in a Whisper block, and one activation scale for all of it costs the most accuracy: on
synthesized speech, dynamic quantization of fc2 alone is two thirds of the encoder's quantization error.
Those MatMuls get int8 weights in blocks of 32 with activations quantized per block as well
(`MatMulNBits`, accuracy level 4), which keeps the error three times lower for about 8% more encoder
time. In the decoder every weight MatMul is blockwise: there one step is a single token, and on 60
synthesized sentences blockwise decoder weights changed fewer transcripts against float32 (10 vs 12) and
lowered WER (7.97% vs 8.15%) for about 1 ms more per token. Convolutions stay float: ConvInteger is
slower than float convolution in ONNX Runtime; their weights and the encoder's sinusoid table are stored
as float16 instead (`store_float16`), which halves 4 MB of tiny.en's encoder at a rounding error (< 5e-4)
far below int8's.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

# Float tensors an int8 bundle stores as float16: convolution weights and the sinusoid table.
FLOAT16 = r"(conv\d\.weight|positional_embedding)$"

# Which weight MatMuls are quantized blockwise, by graph (node names as the exporter writes them).
# A factored fc2 (compress pass) is two MatMuls; the first one takes the GELU output.
BLOCKWISE = {"encoder": r"/mlp\.2/(first/)?MatMul$", "decoder": r"MatMul$"}


def _weight_matmuls(model) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]


def quantize_int8(source: Path, target: Path, blockwise: str | None, block_size: int = 32) -> Path:
    """Quantize `source` into `target`; weight MatMuls whose node name matches `blockwise` get
    blockwise int8 (MatMulNBits), the rest dynamic int8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.ERROR)  # the quantizers log a line per node
    blockwise_nodes = [n for n in _weight_matmuls(onnx.load(str(source), load_external_data=False))
                       if re.search(blockwise, n)] if blockwise else []
    with tempfile.TemporaryDirectory() as tmp:
        dynamic = Path(tmp) / "dynamic.onnx"
        quantize_dynamic(
            str(source), str(dynamic), op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
            weight_type=QuantType.QInt8, nodes_to_exclude=blockwise_nodes, extra_options={"MatMulConstBOnly": True},
        )
        model = onnx.load(str(dynamic))
        if blockwise_nodes:
            quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                             accuracy_level=4, nodes_to_include=blockwise_nodes)
            quantizer.process()
            quantizer.model.topological_sort()
            model = quantizer.model.model
    store_float16(model, FLOAT16)
    onnx.save(model, str(target))
    return target


def store_float16(model, pattern: str) -> None:
    """Store the float32 initializers of `model` (an onnx ModelProto, changed in place) whose names match
    `pattern` as float16, each followed by a Cast back to float32 (which ONNX Runtime folds into a
    constant when it loads the graph)."""
    from onnx import TensorProto, helper, numpy_helper

    for init in [i for i in model.graph.initializer if re.search(pattern, i.name) and i.data_type == TensorProto.FLOAT]:
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype("float16"), init.name + "_fp16")
        model.graph.initializer.remove(init)
        model.graph.initializer.append(half)
        model.graph.node.insert(0, helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))


def quantize_lstm_int8(source: Path, target: Path) -> Path:
    """int8 weights for an LSTM-CTC graph: every weight MatMul, those inside the time loop (a Scan
    subgraph) included, dynamic int8 per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8,
                     extra_options={"MatMulConstBOnly": True, "EnableSubgraph": True})
    return Path(target)
