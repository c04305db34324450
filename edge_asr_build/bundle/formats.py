"""Formats pass: the bundle's models in more formats than ONNX, for other runtimes on devices.

  ort     ONNX Runtime's mobile format: the int8/fp32 ONNX graphs, optimized once (platform-independent
          "extended" level) and serialized as flatbuffers, which onnxruntime-android and minimal builds load
          without parsing protobuf; the Python runtime loads them too (`--backend ort`).
  tflite  LiteRT flatbuffers from the torch model (`tflite_export`), int8 weights for an int8 bundle.

Each function writes into the staged bundle folder and returns the manifest section for its format:
{"graphs": {role: file}, ...}; the caller lists the files with their sha256.
"""

from __future__ import annotations

from pathlib import Path

from edge_asr_build.bundle.tflite_export import MAX_TOKENS, export_whisper_tflite, quantize_tflite_int8
from edge_asr_build.compression.quantize import lookup_from_shared, unsigned_weights

FORMATS = ("onnx", "ort", "tflite")


def parse_formats(text: str) -> list[str]:
    """ "onnx,tflite" -> ["onnx", "tflite"]; ONNX is always built (it is what the others are checked against)."""
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return ["onnx", *(f for f in FORMATS[1:] if f in names)]


def onnx_to_ort(source: Path, target: Path) -> Path:
    import tempfile

    import onnx

    model = onnx.load(str(source))
    tied = lookup_from_shared(model)  # an .ort file keeps its tensors inline: one table, not two
    if unsigned_weights(model) or tied:  # exact products on every CPU (see quantize.unsigned_weights)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(model, str(Path(tmp) / "unsigned.onnx"))
            return _save_ort(Path(tmp) / "unsigned.onnx", Path(target))
    return _save_ort(Path(source), Path(target))


def _save_ort(source: Path, target: Path) -> Path:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # "Extended", not "all": the last level adds layout changes for the build machine's CPU (x86 NCHWc).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return Path(target)


def add_ort(graphs: dict[str, Path], staged: Path) -> dict:
    """An .ort file next to each ONNX graph of the bundle."""
    return {
        "graphs": {role: onnx_to_ort(path, staged / (Path(path).stem + ".ort")).name for role, path in graphs.items()}
    }


def add_whisper_tflite(
    model, staged: Path, work: Path, precision: str, bucket_frames: list[int] = (3000,), jobs: int = 1
) -> dict:
    floats = export_whisper_tflite(model, work, bucket_frames=list(bucket_frames), jobs=jobs)
    graphs = {}
    for role, path in floats.items():
        target = staged / f"{role}.{precision}.tflite"
        if precision in ("int8", "int4"):
            quantize_tflite_int8(path, target, bits=int(precision[3:]))
        else:
            path.replace(target)
        graphs[role] = target.name
    return {"graphs": graphs, "max_tokens": MAX_TOKENS, "encoder_frames": list(bucket_frames)}
