"""The build step end to end: load -> export -> quantize -> package -> evaluate.

Each pass is its own module and usable alone; this file only strings them together, writes into a
temporary folder and moves the finished bundle into place, so a half-built bundle is never used.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edge_asr.bundle import Bundle

from .bundle import save_manifest, write_bundle
from .export import export_decoder, export_encoder
from .loaders import load_whisper
from .quantize import BLOCKWISE, quantize_int8

PRECISIONS = ("int8", "fp32")


def build_whisper_bundle(
    source: str,
    out_dir: Path,
    precision: str = "int8",
    name: str | None = None,
    tokenizer: str | None = None,
    evaluate_on: int = 12,
    threads: int = 2,
    step: Callable[[str], None] = lambda message: None,
) -> dict:
    """Build a bundle from a Whisper source; returns its manifest. `step` is told each pass as it starts."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    name = name or f"{Path(str(source)).name}-{precision}"
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        work = Path(tmp)
        step(f"load {source}")
        loaded = load_whisper(source, tokenizer)
        step("export encoder (ONNX)")
        encoder = export_encoder(loaded.model, work / "encoder.fp32.onnx")
        step("export decoder with KV cache (ONNX)")
        decoder = export_decoder(loaded.model, work / "decoder.fp32.onnx")
        staged = work / "bundle"
        staged.mkdir()
        if precision == "int8":
            step("quantize to int8")
            graphs = {"encoder": quantize_int8(encoder, staged / "encoder.int8.onnx", BLOCKWISE["encoder"]),
                      "decoder": quantize_int8(decoder, staged / "decoder.int8.onnx", BLOCKWISE["decoder"])}
        else:
            graphs = {"encoder": shutil.move(encoder, staged / encoder.name),
                      "decoder": shutil.move(decoder, staged / decoder.name)}
        step("package bundle")
        manifest = write_bundle(loaded, {k: Path(v) for k, v in graphs.items()}, staged, precision, name)
        if evaluate_on:
            step(f"evaluate on {evaluate_on} synthesized sentences")
            manifest["evaluation"]["synthetic"] = evaluate_synthetic(staged, evaluate_on, threads)
            save_manifest(staged, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return manifest


def evaluate_synthetic(bundle_dir: Path, count: int, threads: int = 2) -> dict:
    """WER and RTF of a bundle on maintenance sentences spoken by the default piper voice."""
    from edge_asr.bench import run_bench
    from edge_asr.transcriber import Transcriber

    from .synth import synthetic_set

    folder = synthetic_set(count)
    result = run_bench(Transcriber(Bundle.load(bundle_dir), threads), [folder], runs=1)
    return {"set": folder.name, "description": f"{count} maintenance sentences (seed 0), piper en_US-joe-medium",
            "wer": result["wer"], "words": result["words"], "rtf_wall": result["rtf_wall"], "threads": threads}
