"""Quantize pass: int8 weights for an exported ONNX graph (onnxruntime's dynamic quantization).

Weights of MatMul become int8 with activations quantized on the fly; the token embedding's Gather is
quantized too, so the tied vocabulary matrix is stored once, in int8. Convolutions stay float: ONNX
Runtime's ConvInteger is slower than its float convolution on CPUs, and the two convolutions are a small
share of the encoder.
"""
from __future__ import annotations

import logging
from pathlib import Path

QUANTIZED_OPS = ["MatMul", "Gather"]


def quantize_int8(source: Path, target: Path, per_channel: bool = True) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a line per skipped node
    quantize_dynamic(
        str(source), str(target), op_types_to_quantize=QUANTIZED_OPS, per_channel=per_channel,
        weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
    )
    return target
