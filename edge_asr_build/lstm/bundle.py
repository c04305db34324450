"""Package an LSTM-CTC checkpoint as a bundle: streaming graph (float32 or int8), mel filters, manifest."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edge_asr.ctc import ALPHABET
from edge_asr.frontend import HOP_LENGTH, N_FFT, SAMPLE_RATE
from edge_asr.manifest import Manifest, file_records, header, sha256_file, write_manifest
from edge_asr_build.bundle.formats import add_ort
from edge_asr_build.bundle.whisper import format_files
from edge_asr_build.compression.quantize import quantize_lstm_int8
from edge_asr_build.lstm import cald
from edge_asr_build.lstm.cald_export import export_cald, state_names
from edge_asr_build.lstm.ctc_data import held_out_corpus, held_out_voice
from edge_asr_build.lstm.export import export_lstm
from edge_asr_build.lstm.model import load_lstm, lstm_matrix_params
from edge_asr_build.lstm.tflite_export import add_lstm_tflite
from edge_asr_build.whisper.mel import mel_filters


def build_lstm_bundle(
    checkpoint: Path,
    out_dir: Path,
    precision: str = "int8",
    name: str | None = None,
    evaluate: bool = True,
    threads: int | None = None,
    step: Callable[[str], None] = lambda m: None,
    formats: list[str] = ("onnx",),
) -> Manifest:
    """Export, quantize and package `checkpoint` (.safetensors + .json) into `out_dir`; returns the manifest.
    `formats` beyond "onnx" ("ort", "tflite") add the same model in those formats."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    step(f"load {checkpoint}")
    converted = cald.is_cald_checkpoint(checkpoint)
    model, meta = (cald.load_cald if converted else load_lstm)(checkpoint)
    name = name or out_dir.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        work, staged = Path(tmp), Path(tmp) / "bundle"
        staged.mkdir()
        step("export streaming graph (ONNX)")
        graph = (export_cald if converted else export_lstm)(model, work / "acoustic.fp32.onnx")
        if precision == "int8":
            step("quantize to int8")
            graph = quantize_lstm_int8(graph, staged / "acoustic.int8.onnx")
        else:
            graph = Path(shutil.move(graph, staged / graph.name))
        sections = {}
        if "ort" in formats:
            step("convert to ONNX Runtime's mobile format (.ort)")
            sections["ort"] = add_ort({"acoustic": graph}, staged)
        if "tflite" in formats:
            step(f"export to TFLite ({precision})")
            sections["tflite"] = add_lstm_tflite(model, staged, work, precision)
        np.save(staged / "mel_filters.npy", mel_filters(SAMPLE_RATE, N_FFT, model.config.n_mels))
        files = [graph.name, *format_files(sections), "mel_filters.npy"]
        written = lstm_manifest(model, meta, checkpoint, graph.name, sections, precision, name)
        written |= {"files": file_records(staged, files), "evaluation": {}}
        manifest = write_manifest(staged, written)
        if evaluate:
            step("evaluate on the held-out synthesized set")
            written["evaluation"]["held_out_synthetic"] = evaluate_held_out(staged, threads)
            manifest = write_manifest(staged, written)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return manifest


def lstm_manifest(model, meta: dict, checkpoint: Path, graph: str, sections: dict, precision: str, name: str) -> dict:
    """The manifest of a streaming bundle, but for its "files" and "evaluation": the model and its
    architecture, the source checkpoint and how it was made, the frontend, the character alphabet, CTC."""
    converted = isinstance(model, cald.CaldCtc)
    c = model.config
    if converted:  # Whisper's encoder converted to LSTM blocks: two mel frames per encoder step
        architecture = {
            "architecture": "cald",
            "state": state_names(model),
            "lstm_matrix_parameters": cald.lstm_matrix_params(model),
        }
        stack, alphabet = 2, c.alphabet
    else:
        architecture = {"architecture": "lstm", "lstm_matrix_parameters": lstm_matrix_params(model)}
        stack, alphabet = c.stack, ALPHABET
    weights = checkpoint.with_suffix(".safetensors")
    return header(name) | {
        "model": {
            "family": "lstm-ctc",
            "config": meta["config"],
            "precision": precision,
            "parameters": sum(p.numel() for p in model.parameters()),
            **architecture,
            "graphs": {"acoustic": graph},
            **sections,
        },
        "source": {
            "format": f"{meta['family']} checkpoint",
            "path": str(weights),
            "sha256": sha256_file(weights),
            **{
                k: meta[k]
                for k in ("recipe", "teacher", "compression", "recovery", "training_hours", "provenance")
                if k in meta
            },
        },
        "frontend": {
            "sample_rate": SAMPLE_RATE,
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "n_mels": c.n_mels,
            "stack": stack,
            "features": "log10 mel power of uncentered 25 ms frames, floor 1e-10",
            "mel_filters": "mel_filters.npy",
        },
        "tokenizer": {"type": "characters", "alphabet": alphabet, "blank": 0},
        "decoder": {"type": "ctc", "defaults": {"beam": 0}},
    }


def evaluate_held_out(bundle_dir: Path, threads: int | None = None) -> dict:
    """WER and RTF on dictation, digits and numbers that training never saw, in a voice it never used."""
    import edge_asr
    from edge_asr.bench import run_bench

    result = run_bench(edge_asr.load(bundle_dir, threads), [held_out_corpus(progress=False)], runs=1)
    return {
        "set": "held-out synthesized",
        "description": f"200 utterances, voice {held_out_voice()}",
        "wer": result["wer"],
        "words": result["words"],
        "rtf": result["rtf_wall"],
    }
