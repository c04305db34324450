"""An asset pack for an Android app: the bundle's models in one format, and what an app in Kotlin needs to
drive them without Python, per `ANDROID.md`:

  <assets>/edge-asr/<bundle>/
    manifest.json      the bundle's manifest, cut to this format (sha256 of every file, provenance, WER)
    contract.json      frontend parameters, every graph's input and output names, shapes and types, and the
                       decoder's rules (prompt, special and suppressed tokens) or the CTC alphabet
    mel_filters.f32    the mel filterbank as raw little-endian float32, shape in contract.json
    tokens.json        Whisper only: token id -> byte-level BPE string
    *.ort | *.tflite   the models
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edge_asr.bundle import Bundle
from edge_asr.errors import EdgeAsrError

from .package import slim_bundle


def _onnx_signature(path: Path) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def describe(values) -> list[dict]:
        return [
            {
                "name": v.name,
                "shape": [d if isinstance(d, int) else str(d) for d in v.shape],
                "dtype": v.type.removeprefix("tensor(").removesuffix(")"),
            }
            for v in values
        ]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def _tflite_signatures(path: Path) -> dict:
    from edge_asr.tflite_backend import interpreter_class

    interpreter = interpreter_class()(model_path=str(path))

    def describe(details: dict) -> list[dict]:
        return [
            {"name": k, "shape": [int(d) for d in v["shape"]], "dtype": np.dtype(v["dtype"]).name}
            for k, v in details.items()
        ]

    signatures = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        signatures[name] = {
            "inputs": describe(runner.get_input_details()),
            "outputs": describe(runner.get_output_details()),
        }
    return {"signatures": signatures}


def asset_pack(bundle_path: Path, assets: Path, fmt: str = "ort") -> Path:
    bundle = Bundle.load(bundle_path)
    if fmt not in bundle.formats:
        raise EdgeAsrError(f"{bundle_path}: no {fmt} models in this bundle; rebuild it with --formats onnx,{fmt}")
    out = Path(assets) / "edge-asr" / bundle.manifest.name
    if out.exists():
        shutil.rmtree(out)
    manifest = slim_bundle(bundle, out, [fmt])
    filters = bundle.mel_filters.astype("<f4")
    (out / "mel_filters.f32").write_bytes(filters.tobytes())
    graphs = manifest.model.graphs[fmt]
    describe = _onnx_signature if fmt == "ort" else _tflite_signatures
    contract = {
        "family": bundle.family,
        "format": fmt,
        "runtime": "onnxruntime-android (com.microsoft.onnxruntime)"
        if fmt == "ort"
        else "LiteRT (com.google.ai.edge.litert)",
        "frontend": {k: v for k, v in bundle.manifest.raw["frontend"].items() if k != "mel_filters"}
        | {"mel_filters": {"file": "mel_filters.f32", "shape": list(filters.shape), "dtype": "float32, little-endian"}},
        "graphs": {role: {"file": name, **describe(out / name)} for role, name in graphs.items()},
    }
    if bundle.family == "whisper":
        contract["decoder"] = bundle.manifest.decoder | {
            "tokens": "tokens.json",
            "n_vocab": bundle.manifest.model.dims["n_vocab"],
        }
        if fmt == "tflite":
            contract["decoder"]["max_tokens"] = manifest.model.tflite_max_tokens
    else:
        contract["decoder"] = {"type": "ctc", "alphabet": bundle.manifest.tokenizer.alphabet, "blank": 0}
    (out / "contract.json").write_text(json.dumps(contract, indent=2) + "\n", encoding="utf-8")
    return out
