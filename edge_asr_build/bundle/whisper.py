"""Package pass: graphs, tokenizer and mel filters into a bundle folder with its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_asr.commands import DEFAULT_REJECTION_THRESHOLD
from edge_asr.context import ContextPolicy
from edge_asr.frontend import HOP_LENGTH, N_FFT, SAMPLE_RATE
from edge_asr.guards import Guards
from edge_asr.hotwords import DEFAULT_WHISPER_BONUS, DEFAULT_WHISPER_PROMPT
from edge_asr.manifest import file_records, header
from edge_asr_build.compression.quantize import external_data
from edge_asr_build.sources import LoadedWhisper
from edge_asr_build.whisper.mel import mel_filters
from edge_asr_build.whisper.vocabulary import decoder_section, special_tokens, token_strings


def write_bundle(
    loaded: LoadedWhisper,
    graphs: dict[str, Path],
    out_dir: Path,
    precision: str,
    name: str,
    extra: dict | None = None,
    formats: dict | None = None,
    context: ContextPolicy | None = None,
) -> dict:
    """Write tokens, mel filters and the manifest next to the graphs already in `out_dir`.

    `graphs` maps a role ("encoder", "decoder") to an ONNX file inside out_dir; `formats` holds the manifest
    sections of the same models in other formats ("ort", "tflite"), whose files are in out_dir too.
    Returns the manifest's data, for the caller to add to and write (edge_asr.manifest.write_manifest).
    """
    formats = formats or {}
    out_dir = Path(out_dir)
    dims = loaded.model.dims
    tokens = token_strings(loaded.tokenizer_json, dims.n_vocab)
    special = special_tokens(tokens)
    (out_dir / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
    np.save(out_dir / "mel_filters.npy", mel_filters(SAMPLE_RATE, N_FFT, dims.n_mels))
    # Tensors a graph keeps in files of their own (quantize.store_apart): listed with their checksums.
    data = {role: names for role, path in graphs.items() if (names := external_data(path))}
    files = [
        *(p.name for p in graphs.values()),
        *(n for names in data.values() for n in names),
        *format_files(formats),
        "tokens.json",
        "mel_filters.npy",
    ]
    manifest = header(name) | {
        "model": {
            "family": "whisper",
            "dims": dims.to_dict(),
            "multilingual": dims.is_multilingual,
            "parameters": loaded.model.parameter_count(),
            "precision": precision,
            "graphs": {role: p.name for role, p in graphs.items()},
            **({"graph_data": data} if data else {}),
            **formats,
        },
        "source": loaded.source,
        "frontend": {
            "sample_rate": SAMPLE_RATE,
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "n_mels": dims.n_mels,
            "chunk_seconds": 30,
            "mel_filters": "mel_filters.npy",
            "context": (context or ContextPolicy.full()).to_dict(),
        },
        "tokenizer": {"type": "byte-level-bpe", "tokens": "tokens.json", "special": special},
        "decoder": decoder_section(loaded, special),
        "decoding": decoding_defaults(context),
        "files": file_records(out_dir, files),
        "evaluation": {},
    }
    manifest.update(extra or {})
    return manifest


# Beam search on short windows of an adapted dynamic-context model: up to 5 s of audio (commands; the
# buckets up to 5 s), width 5. Chosen on held-out short clips (`benchmarks/short_clips.py`: real "smart
# mirror" recordings of 3.07 s, and espeak-ng digits by voices the recipe never uses), where beam 5 took
# the adapted model from 10.83% to 8.75% and from 96.67% to 86.67% WER.
SHORT_WINDOW_BEAM = {"max_seconds": 5.0, "beam_size": 5}


def decoding_defaults(context: ContextPolicy | None = None) -> dict:
    """The runtime's decoding thresholds, hotword handling and command mode's rejection threshold, recorded so that a
    deployed bundle keeps the values it was measured with (see edge_asr.guards and edge_asr.hotwords for how
    they were chosen); for a dynamic-context model, beam search on short windows."""
    defaults = {
        "guards": Guards().to_dict(),
        "hotword_bonus": DEFAULT_WHISPER_BONUS,
        "hotword_prompt": DEFAULT_WHISPER_PROMPT,
        "grammar_threshold": DEFAULT_REJECTION_THRESHOLD,
    }
    if context is not None and context.mode == "auto":
        defaults["short_window_beam"] = dict(SHORT_WINDOW_BEAM)
    return defaults


def format_files(formats: dict) -> list[str]:
    """The files of the formats' manifest sections ({"tflite": {"graphs": {role: file}, …}, …})."""
    return [name for section in formats.values() for name in section["graphs"].values()]
