"""The build step end to end: load -> [compress -> recover] -> export -> quantize -> package -> evaluate.

Each pass is its own module and usable alone; this file only strings them together, writes into a
temporary folder and moves the finished bundle into place, so a half-built bundle is never used.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edge_asr.bundle import Bundle
from edge_asr.context import ContextPolicy

from .bundle import save_manifest, write_bundle
from .compress import (DEFAULT_PARTS, CompressionReport, checkpoint_files, compress_whisper, load_compressed,
                       save_compressed)
from .export import export_decoder, export_encoder
from .formats import add_ort, add_whisper_tflite
from .loaders import DEFAULT_SOURCE, load_whisper
from .quantize import BLOCKWISE, quantize_int8
from .recover import (RecoveryConfig, audio_files, decoding_rules, encoder_is_factored, prepare_windows, recover,
                      synthesized_audio)

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
    formats: list[str] = ("onnx",),
    context: ContextPolicy | None = None,
    delta: Path | None = None,
) -> dict:
    """Build a bundle from a Whisper source; returns its manifest. `step` is told each pass as it starts.

    `formats` beyond "onnx" ("ort", "tflite") add the same model in those formats to the bundle. `context`
    is the window policy the manifest records (default: full 30 s); a shorter one needs a model adapted to
    it, whose `delta` (from `adapt_context`) is merged into the weights before export."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    context = context or ContextPolicy.full()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    name = name or f"{Path(str(source)).name}-{precision}"
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        work = Path(tmp)
        step(f"load {source}")
        loaded = load_whisper(source, tokenizer)
        adaptation = None
        if delta is not None:
            step(f"apply the adapted delta {Path(delta).name}")
            adaptation = delta_summary(loaded.model, Path(delta))
        step("export encoder (ONNX)")
        encoder = export_encoder(loaded.model, work / "encoder.fp32.onnx", dynamic_length=context.mode != "full")
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
        graphs = {k: Path(v) for k, v in graphs.items()}
        sections = {}
        if "ort" in formats:
            step("convert to ONNX Runtime's mobile format (.ort)")
            sections["ort"] = add_ort(graphs, staged)
        if "tflite" in formats:
            step(f"export encoder and decoder to TFLite ({precision})")
            sections["tflite"] = add_whisper_tflite(loaded.model, staged, work, precision, context.bucket_frames)
        step("package bundle")
        extra = {"adaptation": adaptation} if adaptation else None
        manifest = write_bundle(loaded, graphs, staged, precision, name, extra=extra, formats=sections, context=context)
        if evaluate_on:
            step(f"evaluate on {evaluate_on} synthesized sentences")
            manifest["evaluation"]["synthetic"] = evaluate_synthetic(staged, evaluate_on, threads)
            save_manifest(staged, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return manifest


def delta_summary(model, delta: Path) -> dict:
    """Merge `delta` into `model` (in place); returns what the manifest records of it."""
    from edge_asr.bundle import sha256_file

    from .lora import apply_delta

    metadata = apply_delta(model, delta)
    result = metadata.get("result", {})
    return {"delta": Path(delta).name, "sha256": sha256_file(Path(delta)), "kind": metadata.get("kind"),
            "rank": metadata.get("rank"), "recipe": metadata.get("recipe"), "corpora": metadata.get("corpora"),
            "held_out_loss": {"before": result.get("held_out_before"), "after": result.get("held_out_best"),
                              "best_step": result.get("best_step")},
            "seconds": metadata.get("seconds")}


def evaluate_synthetic(bundle_dir: Path, count: int, threads: int = 2) -> dict:
    """WER and RTF of a bundle on maintenance sentences spoken by the default piper voice."""
    from edge_asr.bench import run_bench
    from edge_asr.transcriber import Transcriber

    from .synth import synthetic_set

    folder = synthetic_set(count)
    result = run_bench(Transcriber(Bundle.load(bundle_dir), threads), [folder], runs=1)
    return {"set": folder.name, "description": f"{count} maintenance sentences (seed 0), piper en_US-joe-medium",
            "wer": result["wer"], "words": result["words"], "rtf_wall": result["rtf_wall"], "threads": threads}


# --- compression and recovery ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompactRecipe:
    """How `build --compact` makes a compact model from its source: compress, then recover on synthesized
    speech. Chosen on synthesized held-out sentences only (same voice, other sentences). Everything is
    seeded, so the same recipe gives the same model; its hash names the cached checkpoint.
    """

    keep: float = 0.55
    parts: tuple[str, ...] = DEFAULT_PARTS
    attention: str = "joint"
    frequent_tokens: int = 4000
    sentences: int = 400
    data_seed: int = 1
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def key(self, source_sha256: str) -> str:
        text = json.dumps({"recipe": asdict(self), "source": source_sha256, "version": 2}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def compress_checkpoint(source: str, out: Path, keep: float | None = None, energy: float | None = None,
                        parts=DEFAULT_PARTS, attention: str = "joint", frequent_tokens: int = 4000,
                        step: Callable[[str], None] = lambda message: None) -> tuple[Path, CompressionReport]:
    """Load `source`, compress it and save the factored model (out.safetensors + out.json)."""
    step(f"load {source}")
    loaded = load_whisper(source)
    step("factor (SVD)")
    model, report = compress_whisper(loaded.model, keep=keep, energy=energy, parts=parts, attention=attention,
                                     frequent_tokens=frequent_tokens)
    teacher = source if source == DEFAULT_SOURCE or not Path(source).exists() else str(Path(source).resolve())
    return save_compressed(model, Path(out), {"teacher": teacher, "compression": report.to_dict()}), report


def recover_checkpoint(checkpoint: Path, out: Path, audio: Path | None = None, sentences: int = 400,
                       data_seed: int = 1, config: RecoveryConfig | None = None,
                       step: Callable[[str], None] = lambda message: None) -> tuple[Path, dict]:
    """Fine-tune a compressed checkpoint against its teacher on `audio` (a folder) or, without one, on
    `sentences` synthesized dictation sentences; saves out.safetensors + out.json."""
    config = config or RecoveryConfig()
    meta = json.loads(checkpoint_files(checkpoint)[1].read_text())
    teacher = load_whisper(meta["teacher"])
    student, _ = load_compressed(checkpoint)
    if audio is None:
        step(f"synthesize {sentences} sentences")
        audio = synthesized_audio(sentences, data_seed)
    files = audio_files(Path(audio))
    step(f"pseudo-label {len(files)} files with the teacher")
    windows = prepare_windows(teacher.model, files, decoding_rules(teacher), config.seed, config.max_tokens,
                              keep_features=not encoder_is_factored(student))
    step("recover (distillation)")
    summary = recover(student, teacher.model, windows, config, log=lambda m: print(m, file=sys.stderr))
    summary["audio"] = str(audio)
    return save_compressed(student, Path(out), {"teacher": meta["teacher"], "compression": meta.get("compression"),
                                                "recovery": summary}), summary


def compact_checkpoint(source: str = DEFAULT_SOURCE, recipe: CompactRecipe | None = None,
                       step: Callable[[str], None] = lambda message: None) -> Path:
    """The compressed and recovered model of `source` by `recipe`, made once and cached."""
    from edge_asr.paths import home

    recipe = recipe or CompactRecipe()
    source_sha = load_whisper(source).source["sha256"]
    weights, description = checkpoint_files(home() / "models" / f"{Path(str(source)).name}-compact-{recipe.key(source_sha)}")
    if description.exists() and weights.exists():
        return description
    home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home(), prefix=".compact.") as tmp:
        compressed, _ = compress_checkpoint(source, Path(tmp) / "compressed", keep=recipe.keep, parts=recipe.parts,
                                            attention=recipe.attention, frequent_tokens=recipe.frequent_tokens, step=step)
        recovered, _ = recover_checkpoint(compressed, Path(tmp) / "recovered", sentences=recipe.sentences,
                                          data_seed=recipe.data_seed, config=recipe.recovery, step=step)
        weights.parent.mkdir(parents=True, exist_ok=True)
        recovered_weights, recovered_description = checkpoint_files(recovered)
        shutil.move(recovered_weights, weights)
        shutil.move(recovered_description, description)  # last: its presence means complete
    return description
