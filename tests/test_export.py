"""Exported graphs compute what the PyTorch model computes."""

import numpy as np
import pytest
import torch

from edge_asr.backend import OnnxWhisper
from edge_asr.bundle import Bundle
from edge_asr.decoding import forced_decoding
from edge_asr.frontend import window_features
from edge_asr_build.whisper.mel import mel_filters


@pytest.fixture(scope="module")
def mel(speech):
    audio = speech[1][1]
    return window_features(audio, mel_filters())


def _torch_reference(model, mel, tokens):
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(mel)[None])
        cross = [t.numpy() for pair in model.decoder.cross_kv(features) for t in pair]
        logits = model.decoder(torch.tensor([tokens]), features)[0]
    return cross, logits.numpy()


@pytest.fixture(scope="module")
def tokens(tiny, speech):
    """The prompt and the tokens of what speech[1] says: a realistic decoding path."""
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(tiny.tokenizer_json)).encode(" " + speech[1][0], add_special_tokens=False).ids
    return [50257, 50362, *text]


def test_fp32_onnx_matches_torch(tiny, bundle_fp32, mel, tokens):
    ref_cross, ref_logits = _torch_reference(tiny.model, mel, tokens)
    cross, logits, cache = forced_decoding(OnnxWhisper(Bundle.load(bundle_fp32)), mel, tokens[:2], tokens[2:])
    assert len(cross) == len(ref_cross) == 8
    assert max(np.abs(a - b).max() for a, b in zip(cross, ref_cross)) < 1e-3
    assert np.abs(logits - ref_logits[1:]).max() < 1e-3  # every decoding step, through the KV cache
    assert cache[0].shape == (1, 6, 64, len(tokens)) and cache[1].shape == (1, 6, len(tokens), 64)


def test_int8_onnx_stays_close_to_torch(tiny, bundle_int8, mel, tokens):
    _, ref_logits = _torch_reference(tiny.model, mel, tokens)
    _, logits, _ = forced_decoding(OnnxWhisper(Bundle.load(bundle_int8)), mel, tokens[:2], tokens[2:])
    # int8 moves logits, but the ranking that greedy decoding uses is kept at (almost) every step.
    agree = (logits.argmax(-1) == ref_logits[1:].argmax(-1)).mean()
    assert agree >= 0.9
    assert np.corrcoef(logits.ravel(), ref_logits[1:].ravel())[0, 1] > 0.99


def test_int8_bundle_is_smaller_and_described(bundle_int8, bundle_fp32):
    int8, fp32 = Bundle.load(bundle_int8), Bundle.load(bundle_fp32)
    assert int8.size_bytes < 0.35 * fp32.size_bytes
    assert int8.formats == fp32.formats == ["onnx", "ort", "tflite"]
    m = int8.manifest
    assert m.model.precision == "int8" and m.model.parameters == 37_184_256
    assert m.decoder["prompt"] == [50257, 50362]
    graphs = {f"{role}.int8.{ext}" for role in ("encoder", "decoder") for ext in ("onnx", "ort", "tflite")}
    assert set(m.files) == graphs | {"decoder.int8.rows.bin", "tokens.json", "mel_filters.npy"}
    assert m.model.graph_data == {"decoder": ["decoder.int8.rows.bin"]}
    assert m.model.graphs["tflite"] == {"encoder": "encoder.int8.tflite", "decoder": "decoder.int8.tflite"}
    for fmt in int8.formats:  # what each backend loads is an int8 model of about the same size
        assert (
            0.25 * fp32.model_bytes(fmt)
            < int8.model_bytes(fmt)
            < 0.35 * fp32.model_bytes(fmt)
            + ((bundle_int8 / "decoder.int8.rows.bin").stat().st_size if fmt == "onnx" else 0)
        )
    assert m.raw["source"]["format"] == "ctranslate2" and len(m.raw["source"]["sha256"]) == 64


@pytest.mark.parametrize("blockwise", [None, "MatMul$"])
def test_int8_matmul_is_exact_on_this_cpu_where_pairs_of_products_overflow_16_bits(tmp_path, blockwise):
    """The runtime's quantized MatMul computes what its own 8-bit numbers say, on any CPU, in both ONNX
    Runtime formats. Activations and weights at the ends of their ranges make sums of two products past
    32767: ONNX Runtime's uint8 x int8 kernel saturates those on x86 CPUs without VNNI unless told not to
    (it did on an AVX2 EPYC: wrong by up to half a row), so a bundle computed another function there."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_asr.backend import onnx_session
    from edge_asr_build.bundle.formats import onnx_to_ort
    from edge_asr_build.compression.quantize import quantize_int8

    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (256, 64)).astype(np.float32)
    weight[:, :8] = np.sign(weight[:, :8])  # channels at full scale throughout
    x = rng.uniform(-1, 1, (8, 256)).astype(np.float32)
    x[0] = np.sign(weight[:, 0])  # activations at the ends of the range, aligned with them
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    quantize_int8(source, target, blockwise)
    for path in (target, onnx_to_ort(target, tmp_path / "int8.ort")):
        y = onnx_session(path, threads=None).run(None, {"x": x})[0]
        # 8-bit rounding of both sides moves each output by well under 2% of its scale (256 terms of +-1).
        assert np.abs(y - x @ weight).max() < 0.02 * np.abs(x @ weight).max(), path.name


def test_tied_lookup_reads_rows_of_its_own_with_the_same_numbers(tmp_path):
    """The int8 token lookup reads a row table kept apart from the graph (mapped in place, so only the
    rows looked up become resident), and computes exactly what it computed when it shared the output
    projection's weight; the .ort file shares the weight again, holding the table once."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_asr.backend import onnx_session
    from edge_asr_build.bundle.formats import onnx_to_ort
    from edge_asr_build.compression.quantize import external_data, lookup_from_shared, quantize_int8

    rng = np.random.default_rng(0)
    vocabulary, width = 300, 64
    table = rng.normal(size=(width, vocabulary)).astype(np.float32)  # stored transposed, as the exporter does
    nodes = [
        helper.make_node("Gather", ["table", "tokens"], ["columns"], name="Gather", axis=1),
        helper.make_node("Transpose", ["columns"], ["embedded"], name="T", perm=[1, 0]),
        helper.make_node("MatMul", ["embedded", "table"], ["logits"], name="Projection"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [5])],
        [
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [5, width]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [5, vocabulary]),
        ],
        [numpy_helper.from_array(table, "table")],
    )
    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    quantize_int8(source, target, None)
    assert external_data(target) == ["int8.rows.bin"]
    model = onnx.load(str(target), load_external_data=False)
    lookup = next(n for n in model.graph.node if n.op_type == "Gather")
    assert lookup.input[0].endswith("_rows") and lookup.attribute[0].i == 0

    tokens = {"tokens": np.array([0, 7, 299, 7, 42], np.int64)}
    embedded, logits = onnx_session(target, threads=None).run(None, tokens)
    assert np.abs(embedded - table.T[tokens["tokens"]]).max() < 0.01 * np.abs(table).max()  # int8 rounding
    shared = onnx.load(str(target))
    assert lookup_from_shared(shared)
    assert not any(i.name.endswith("_rows") for i in shared.graph.initializer)
    onnx.save(shared, str(tmp_path / "shared.onnx"))
    for path in (tmp_path / "shared.onnx", onnx_to_ort(target, tmp_path / "int8.ort")):
        again = onnx_session(path, threads=None).run(None, tokens)
        assert np.array_equal(again[0], embedded) and np.allclose(again[1], logits, atol=1e-5), path.name
    assert (tmp_path / "int8.ort").stat().st_size < (tmp_path / "int8.rows.bin").stat().st_size * 1.5
