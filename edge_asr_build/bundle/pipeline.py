"""The build step end to end: load -> [compress -> recover] -> export -> quantize -> package -> evaluate.

Each pass is its own module and usable alone; this file only strings them together, writes into a
temporary folder and moves the finished bundle into place, so a half-built bundle is never used.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from edge_asr.bench import run_bench
from edge_asr.bundle import Bundle
from edge_asr.context import ContextPolicy
from edge_asr.manifest import Manifest, write_manifest
from edge_asr.threads import resolve_threads
from edge_asr.transcriber import Transcriber
from edge_asr_build.bundle.formats import add_ort, add_whisper_tflite
from edge_asr_build.bundle.onnx_export import export_decoder, export_encoder
from edge_asr_build.bundle.whisper import write_bundle
from edge_asr_build.compression.calibration import CalibrationMix, Distortion
from edge_asr_build.compression.compress import CompressionReport, compress_whisper, save_compressed
from edge_asr_build.compression.factors import DEFAULT_PARTS, PARTS
from edge_asr_build.compression.quantize import BLOCKWISE, quantize_int4, quantize_int8
from edge_asr_build.recipes.compact import calibrate as calibration_of
from edge_asr_build.recipes.deltas import apply_delta_file
from edge_asr_build.sources import DEFAULT_SOURCE, load_whisper
from edge_asr_build.speech.synth import synthetic_set

PRECISIONS = ("int8", "int4", "fp32")


def build_whisper_bundle(
    source: str,
    out_dir: Path,
    precision: str = "int8",
    name: str | None = None,
    tokenizer: str | None = None,
    evaluate_on: int = 12,
    threads: int | None = None,
    step: Callable[[str], None] = lambda message: None,
    formats: list[str] = ("onnx",),
    context: ContextPolicy | None = None,
    delta: Path | None = None,
    compact_delta: Path | None = None,
) -> Manifest:
    """Build a bundle from a Whisper source; returns its manifest. `step` is told each pass as it starts.

    `formats` beyond "onnx" ("ort", "tflite") add the same model in those formats to the bundle. `context`
    is the window policy the manifest records (default: full 30 s); a shorter one needs a model adapted to
    it, whose `delta` (from `adapt_context`) is merged into the weights before export. `compact_delta` (from
    `compact.recover_compact`) makes the compact model: activation-aware factors rebuilt and checked, then
    the recovered adapters merged."""

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    threads = resolve_threads(threads)
    torch.set_num_threads(threads)
    context = context or ContextPolicy.full()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    name = name or f"{Path(str(source)).name}-{precision}"
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        work = Path(tmp)
        step(f"load {source}")
        loaded = load_whisper(source, tokenizer)
        adaptation = None
        if compact_delta is not None:
            if delta is not None:
                raise ValueError("a compact model has no dynamic-context delta yet: build it with --context full")
            adaptation = apply_delta_file(loaded, Path(compact_delta), step, expect="compact-lora")
        if delta is not None:
            step(f"apply the adapted delta {Path(delta).name}")
            adaptation = apply_delta_file(loaded, Path(delta), step)
        step("export encoder (ONNX)")
        encoder = export_encoder(loaded.model, work / "encoder.fp32.onnx", dynamic_length=context.mode != "full")
        step("export decoder with KV cache (ONNX)")
        decoder = export_decoder(loaded.model, work / "decoder.fp32.onnx")
        staged = work / "bundle"
        staged.mkdir()
        graphs = quantized_graphs({"encoder": encoder, "decoder": decoder}, precision, staged, step)
        sections = {}
        if "ort" in formats:
            step("convert to ONNX Runtime's mobile format (.ort)")
            sections["ort"] = add_ort(graphs, staged)
        if "tflite" in formats:
            step(f"export encoder and decoder to TFLite ({precision})")
            sections["tflite"] = add_whisper_tflite(
                loaded.model, staged, work, precision, context.bucket_frames, jobs=threads
            )
        step("package bundle")
        extra = {"adaptation": adaptation} if adaptation else None
        written = write_bundle(loaded, graphs, staged, precision, name, extra=extra, formats=sections, context=context)
        manifest = write_manifest(staged, written)
        if evaluate_on:
            step(f"evaluate on {evaluate_on} synthesized sentences")
            written["evaluation"]["synthetic"] = evaluate_synthetic(staged, evaluate_on, threads)
            manifest = write_manifest(staged, written)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return manifest


def quantized_graphs(graphs: dict[str, Path], precision: str, staged: Path, step: Callable[[str], None]) -> dict:
    """The float32 ONNX `graphs` (encoder, decoder) at `precision`, in the bundle folder `staged`."""
    if precision == "int8":
        step("quantize to int8")
        return {
            role: Path(quantize_int8(path, staged / f"{role}.int8.onnx", BLOCKWISE[role]))
            for role, path in graphs.items()
        }
    if precision == "int4":
        step("quantize to int4")
        return {role: Path(quantize_int4(path, staged / f"{role}.int4.onnx")) for role, path in graphs.items()}
    return {role: Path(shutil.move(path, staged / Path(path).name)) for role, path in graphs.items()}


def evaluate_synthetic(bundle_dir: Path, count: int, threads: int | None = None) -> dict:
    """WER and RTF of a bundle on maintenance sentences spoken by the default piper voice."""

    folder = synthetic_set(count)
    result = run_bench(Transcriber(Bundle.load(bundle_dir), threads), [folder], runs=1)
    return {
        "set": folder.name,
        "description": f"{count} maintenance sentences (seed 0), piper en_US-joe-medium",
        "wer": result["wer"],
        "words": result["words"],
        "rtf_wall": result["rtf_wall"],
        "threads": resolve_threads(threads),
    }


# --- compression ----------------------------------------------------------------------------------------------


def compress_checkpoint(
    source: str,
    out: Path,
    keep: float | None = None,
    energy: float | None = None,
    parts=DEFAULT_PARTS,
    attention: str = "joint",
    frequent_tokens: int = 4000,
    calibrate: bool = True,
    measured: bool = False,
    step: Callable[[str], None] = lambda message: None,
) -> tuple[Path, CompressionReport]:
    """Load `source`, compress it and save the factored model (out.safetensors + out.json). With `calibrate`,
    factors are activation-aware (on the recipe's calibration clips); with `measured`, ranks come from the
    measured output distortion of each matrix instead of its singular-value energy."""

    unknown = set(parts) - set(PARTS)
    if unknown:  # before minutes of calibration
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError("keep must be a fraction in (0, 1]")
    step(f"load {source}")
    loaded = load_whisper(source)
    moments = distortion = None
    if calibrate or measured:
        calibration = calibration_of(loaded, CalibrationMix(), step, tuple(parts))
        moments = calibration.moments if calibrate else None
        if measured:
            distortion = Distortion.of_reference(loaded.model, calibration.items[:32])
    step("factor (SVD)")
    model, report = compress_whisper(
        loaded.model,
        keep=keep,
        energy=energy,
        parts=parts,
        attention=attention,
        frequent_tokens=frequent_tokens,
        moments=moments,
        distortion=distortion,
        progress=lambda jobs, desc: tqdm(jobs, desc=desc, unit="cut", leave=False),
    )
    teacher = source if source == DEFAULT_SOURCE or not Path(source).exists() else str(Path(source).resolve())
    return save_compressed(
        model, Path(out), {"teacher": teacher, "compression": report.to_dict(), "activation_aware": bool(moments)}
    ), report
