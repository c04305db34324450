"""Quantize pass: int8 or int4 weights for an exported ONNX graph, with ONNX Runtime's own quantizers.

Most MatMul weights become int8 per output channel with activations quantized on the fly, one scale
per tensor (`quantize_dynamic`): the fastest int8 path on CPUs. The token embedding's Gather is
quantized too, so the tied vocabulary matrix is stored once, in int8.

The weights are signed int8, as ONNX Runtime's and LiteRT's fast kernels expect. On x86 CPUs without
VNNI (AVX2, and AVX-512 before VNNI) ONNX Runtime's uint8 x int8 kernel adds pairs of products in 16 bits
with saturation (VPMADDUBSW), so there a bundle would compute another function than on VNNI or ARM CPUs:
on an AVX2 EPYC, tiny.en's dev pooled WER moved from 5.11% to 4.26% and compact's from 9.94% to 7.10%,
and golden-transcript and LSTM tests failed. The runtime turns on ONNX Runtime's own remedy, which on such
CPUs alone stores those weights as uint8 when it loads the graph (session.x64quantprecision, in
`edge_asr.backend`): the same bundle then computes the same function on every CPU, 5.11% and 9.94%
there too (to 1 word), at no measurable cost (dev LJSpeech RTF 0.0675 against 0.0672 saturating).
`.ort` files skip that load-time step, so `unsigned_weights` does it for them when they are made.

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

int4 (`quantize_int4`) makes every weight MatMul 4-bit blockwise and stores the tied embedding once, its
lookup reading the projection's 4-bit bytes. On 50 held-out synthesized sentences it costs tiny.en 3.9
points of WER against int8 (8.83% vs 4.93%); keeping the embedding in int8 still costs 2.5 (7.39%).
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np

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
    blockwise_nodes = (
        [n for n in _weight_matmuls(onnx.load(str(source), load_external_data=False)) if re.search(blockwise, n)]
        if blockwise
        else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        dynamic = Path(tmp) / "dynamic.onnx"
        quantize_dynamic(
            str(source),
            str(dynamic),
            op_types_to_quantize=["MatMul", "Gather"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=blockwise_nodes,
            extra_options={"MatMulConstBOnly": True},
        )
        model = onnx.load(str(dynamic))
        if blockwise_nodes:
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=8,
                block_size=block_size,
                is_symmetric=True,
                accuracy_level=4,
                nodes_to_include=blockwise_nodes,
            )
            quantizer.process()
            quantizer.model.topological_sort()
            model = quantizer.model.model
    rows = lookup_from_rows(model)
    store_float16(model, FLOAT16)
    if rows is not None:
        store_apart(rows, target.with_name(target.stem + ".rows.bin"))
    onnx.save(model, str(target))
    return target


def lookup_from_rows(model):
    """Give the tied token embedding's lookup a table of its own, a row per token, and return it (None
    where no lookup shares a MatMulInteger's weight).

    The output projection's MatMulInteger packs its weight into the kernel's layout when the session loads,
    and ONNX Runtime frees the weight afterwards unless another node reads it. The lookup did, so the
    vocabulary matrix was resident twice: packed, and as the Gather's table (20 MB in tiny.en). A row-major
    table read from a file mapped in place (`store_apart`) costs only the pages of the tokens looked up, at
    the price of those 20 MB on disk. The rows hold the same bytes as the shared weight, so the lookup's
    values are unchanged."""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    projected = {n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger"}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in projected), None)
    if gather is None or any(a.name == "axis" and a.i != 1 for a in gather.attribute):
        return None
    dequantize = next(n for n in model.graph.node if gather.output[0] in n.input)
    weight = numpy_helper.to_array(initializers[gather.input[0]])
    rows = numpy_helper.from_array(np.ascontiguousarray(weight.T), gather.input[0] + "_rows")
    # The projection's zero point may be rewritten to uint8 at load time (session.x64quantprecision); the
    # lookup's table is not, so it keeps a zero point of its own.
    zero_point = numpy_helper.from_array(
        numpy_helper.to_array(initializers[dequantize.input[2]]), rows.name + "_zero_point"
    )
    model.graph.initializer.extend([rows, zero_point])
    rows = model.graph.initializer[-2]  # extend copies: the graph's own message is the one to move out
    dequantize.input[2] = zero_point.name
    position = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(
        position,
        helper.make_node("Gather", [rows.name, gather.input[1]], [rows.name + "_looked_up"], name=gather.name, axis=0),
    )
    model.graph.node.insert(
        position + 1,
        helper.make_node(
            "Transpose", [rows.name + "_looked_up"], [gather.output[0]], name=gather.name + "_t", perm=[1, 0]
        ),
    )
    return rows


def lookup_from_shared(model) -> bool:
    """Undo `lookup_from_rows`: the lookup reads the projection's weight again (Gather on axis 1), and the
    row table and its zero point leave the graph. For `.ort` files, which keep every tensor inline: there
    the rows would add their 20 MB to the file. True where the graph had a row table."""
    from onnx import helper

    nodes = list(model.graph.node)
    gather = next((n for n in nodes if n.op_type == "Gather" and n.input[0].endswith("_rows")), None)
    if gather is None:
        return False
    rows = gather.input[0]
    transpose = next(n for n in nodes if n.op_type == "Transpose" and n.input[0] == gather.output[0])
    dequantize = next(n for n in nodes if transpose.output[0] in n.input)
    projection = next(n for n in nodes if n.op_type == "MatMulInteger" and n.input[1] == rows[: -len("_rows")])
    dequantize.input[2] = projection.input[3]
    position = nodes.index(gather)
    model.graph.node.remove(gather)
    model.graph.node.remove(transpose)
    model.graph.node.insert(
        position,
        helper.make_node(
            "Gather", [projection.input[1], gather.input[1]], [transpose.output[0]], name=gather.name, axis=1
        ),
    )
    kept = [i for i in model.graph.initializer if i.name not in (rows, rows + "_zero_point")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return True


def store_apart(tensor, path: Path) -> None:
    """Move `tensor`'s bytes out of the graph into `path` (ONNX external data, at offset 0), which ONNX
    Runtime maps into memory instead of copying: a page becomes resident only when it is read."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    write_in_pieces(path, tensor.raw_data)
    set_external_data(tensor, location=path.name, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def write_in_pieces(path: Path, data: bytes, piece: int = 64 * 1024) -> None:
    """Write a file the runtime maps into memory (external data, a TFLite model) 64 KB at a time. Linux
    (6.x, ext4) caches a file written in one call in folios of up to 2 MB, and a mapping of it maps a
    whole folio when one of its bytes is read: on the machine that built it, transcribing a 4 s clip made 13
    MB of the 20 MB token table resident; written in pieces, 1.7 MB. (A copy made by cp or tar, as on a device,
    is written in pieces anyway.)"""
    view = memoryview(data)
    with open(path, "wb") as f:
        for start in range(0, len(view), piece):
            f.write(view[start : start + piece])


def external_data(path: Path) -> list[str]:
    """The files an ONNX graph keeps tensors in, beside it."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return sorted(
        {ExternalDataInfo(t).location for g in _graphs(model.graph) for t in g.initializer if uses_external_data(t)}
    )


def quantize_int4(source: Path, target: Path, block_size: int = 32) -> Path:
    """4-bit weights: every weight MatMul blockwise (MatMulNBits, 4 bits, symmetric, blocks of `block_size`,
    int8 compute), and every lookup table that is also a MatMul weight (the tied token embedding, or its
    factors) shares that MatMul's 4-bit matrix (`_share_with_matmul`), so the largest tensor is stored
    once, at half a byte per weight. Convolutions and the sinusoid table stay float16 as in int8."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.ERROR)
    model = onnx.load(str(source))
    initializers = {i.name for i in model.graph.initializer}
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers}
    tied = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in matmul_weights]
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",)
    )
    quantizer.process()
    quantizer.model.topological_sort()
    model = quantizer.model.model
    for gather in tied:
        _share_with_matmul(model, gather, block_size)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    store_float16(model, FLOAT16)
    onnx.save(model, str(target))
    return Path(target)


def _share_with_matmul(model, gather, block_size: int) -> None:
    """Replace `gather` (axis 1 of a (K, N) weight that a MatMul also reads, quantized by now to MatMulNBits)
    by GatherBlockQuantized on the MatMulNBits matrix itself. MatMulNBits stores B^T as (N, K / block, block / 2)
    bytes with scales (N, K / block) and an implicit zero point of 8, which is GatherBlockQuantized's layout for
    uint8 data gathered on axis 0: the lookup reads the same bytes. Its rows come out as (n, K / block, block),
    are reshaped to (n, K) and transposed back to the (K, n) the Gather gave."""
    from onnx import helper, numpy_helper

    attributes = {a.name: a for a in gather.attribute}
    axis = helper.get_attribute_value(attributes["axis"]) if "axis" in attributes else 0
    matmul = next(
        (n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0] + "_Q4"), None
    )
    if matmul is None or axis != 1:
        return  # left as a float lookup
    k, n = (next(helper.get_attribute_value(a) for a in matmul.attribute if a.name == name) for name in ("K", "N"))
    if k % block_size:
        return
    name = gather.name or gather.output[0]
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([n, -1, 1], np.int64), f"{name}_scales_shape"),
            numpy_helper.from_array(np.array([-1, k], np.int64), f"{name}_rows_shape"),
        ]
    )
    nodes = [
        helper.make_node(
            "Reshape", [matmul.input[2], f"{name}_scales_shape"], [f"{name}_scales"], name=f"{name}_scales"
        ),
        helper.make_node(
            "GatherBlockQuantized",
            [matmul.input[1], gather.input[1], f"{name}_scales"],
            [f"{name}_blocks"],
            name=f"{name}_Q4",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=2,
            block_size=block_size,
            bits=4,
        ),
        helper.make_node("Reshape", [f"{name}_blocks", f"{name}_rows_shape"], [f"{name}_rows"], name=f"{name}_rows"),
        helper.make_node("Transpose", [f"{name}_rows"], [gather.output[0]], name=f"{name}_t", perm=[1, 0]),
    ]
    position = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)


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


def _graphs(graph):
    """`graph` and every subgraph in it (a Scan's body, for instance), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _graphs(sub)


def unsigned_weights(model) -> int:
    """Store the int8 weights of `model`'s MatMulInteger nodes (and their zero points) as uint8, the same
    numbers shifted by 128, so that (a - a0)(w - w0) is unchanged; `model` (an onnx ModelProto) is changed
    in place, and the number of weights changed is returned.

    This is what ONNX Runtime itself does when it loads an `.onnx` graph on an x86 CPU without VNNI
    (session.x64quantprecision, set by the runtime), where its uint8 x int8 kernel would saturate.
    `.ort` files are loaded without that step, so they get it here, once, for every CPU."""
    from onnx import TensorProto, numpy_helper

    graphs = list(_graphs(model.graph))
    initializers = {i.name: i for g in graphs for i in g.initializer}
    names = {
        name
        for g in graphs
        for n in g.node
        if n.op_type == "MatMulInteger"
        for name in (n.input[1], n.input[3] if len(n.input) > 3 else "")
        if name in initializers and initializers[name].data_type == TensorProto.INT8
    }
    for name in names:
        shifted = (numpy_helper.to_array(initializers[name]).astype(np.int16) + 128).astype(np.uint8)
        initializers[name].CopyFrom(numpy_helper.from_array(shifted, name))
    return len(names)


def quantize_lstm_int8(source: Path, target: Path) -> Path:
    """int8 weights for an LSTM-CTC graph: every weight MatMul, those inside the time loop (a Scan
    subgraph) included, dynamic int8 per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True, "EnableSubgraph": True},
    )
    return Path(target)
