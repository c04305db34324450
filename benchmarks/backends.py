#!/usr/bin/env python3
"""The same bundle on every backend it carries (ONNX Runtime from .onnx and .ort, LiteRT from .tflite):
do they say the same thing, how close are their outputs, and how fast is each on this machine.

For each bundle and synthesized utterance, the ONNX backend's greedy text is the reference. Whisper: the
other backends are teacher-forced through ONNX's tokens and every step's logits are compared (the encoder
too, through the cross-attention keys and values it hands the decoder). LSTM-CTC: the log-probabilities of
every step from one pass over the utterance. Then `edge-asr bench --json --backend B`, each in its own
process so peak RSS is its own: WER, RTF wall and CPU (median of --runs), the model files' size.

  python benchmarks/backends.py --bundle ~/b/tiny.en-fp32 --bundle ~/b/tiny.en-int8      # 20 synthesized
  python benchmarks/backends.py --bundle ~/b/digits-int8 --set ~/.cache/edge-asr/synth/ctc-heldout-...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import edge_asr
from edge_asr.audio import load_audio
from edge_asr.bundle import Bundle
from edge_asr.decoding import forced_decoding
from edge_asr.frontend import LogMelStream, window_features


def read_set(folder: Path) -> list[tuple[str, Path]]:
    rows = [line.split("\t", 1) for line in (folder / "refs.tsv").read_text(encoding="utf-8").splitlines() if line]
    return [(uid, next(folder.glob(f"{uid}.*"))) for uid, _ in rows]


def whisper_outputs(transcriber, audio: np.ndarray, tokens: list[int] | None):
    """Cross-attention inputs and per-step logits for `tokens` (ONNX's own when None), plus the tokens."""
    decoder = transcriber.decoder
    mel = window_features(audio, transcriber.bundle.mel_filters, transcriber.context.frames(len(audio)))
    if tokens is None:
        tokens = decoder.decode(decoder.prefill(mel)).tokens
    cross, logits, _ = forced_decoding(transcriber.model, mel, decoder.prompt, tokens)
    return np.concatenate([c.ravel() for c in cross]), logits, tokens


def lstm_outputs(transcriber, audio: np.ndarray) -> np.ndarray:
    frames = LogMelStream(transcriber.bundle.mel_filters).accept(audio)
    frames = frames[: len(frames) - len(frames) % transcriber.model.stack]
    return transcriber.model.run(frames, transcriber.model.initial_state())[0]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference; infinite if either side has a NaN (which max() would silently skip)."""
    diff = np.abs(a - b)
    return float("inf") if np.isnan(diff).any() else float(diff.max())


def compare(bundle_path: str, items: list[tuple[str, Path]], threads: int) -> list[dict]:
    bundle = Bundle.load(bundle_path)
    backends = {b: edge_asr.load(bundle, threads, backend=b) for b in bundle.formats}
    reference, reference_texts = backends["onnx"], {}
    rows = []
    for name, transcriber in backends.items():
        same_text, logit_diff, encoder_diff = 0, 0.0, 0.0
        for _, path in items:
            audio = load_audio(path)
            if path not in reference_texts:
                reference_texts[path] = reference.transcribe(audio).text
            same_text += transcriber.transcribe(audio).text == reference_texts[path]
            if bundle.family == "lstm-ctc":
                logit_diff = max(logit_diff, max_diff(lstm_outputs(transcriber, audio), lstm_outputs(reference, audio)))
                continue
            cross_ref, logits_ref, tokens = whisper_outputs(reference, audio, None)
            cross, logits, _ = whisper_outputs(transcriber, audio, tokens)
            logit_diff = max(logit_diff, max_diff(logits, logits_ref))
            encoder_diff = max(encoder_diff, max_diff(cross, cross_ref))
        rows.append(
            {
                "bundle": bundle.manifest.name,
                "precision": bundle.manifest.model.precision,
                "backend": name,
                "same_text": same_text,
                "n": len(items),
                "max_logit_diff": logit_diff,
                "max_encoder_diff": encoder_diff if bundle.family != "lstm-ctc" else None,
            }
        )
    return rows


def bench(bundle: str, backend: str, folder: Path, threads: int, runs: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "edge_asr",
        "bench",
        "--json",
        "--bundle",
        bundle,
        "--backend",
        backend,
        "--threads",
        str(threads),
        "--runs",
        str(runs),
        str(folder),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"edge-asr bench failed on {bundle} ({backend}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="bundle directory (repeatable)")
    ap.add_argument("--set", type=Path, help="folder with refs.tsv (default: 20 synthesized maintenance sentences)")
    ap.add_argument("--count", type=int, default=20, help="synthesized sentences when no --set (default 20)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed passes per backend; RTF is their median")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.set is None:
        from edge_asr_build.speech.synth import synthetic_set

        args.set = synthetic_set(args.count, seed=11)
    items = read_set(args.set)
    print(f"{len(items)} utterances from {args.set}; {args.threads} threads; RTF median of {args.runs} runs\n")
    rows = []
    for bundle in args.bundle:
        for row in compare(bundle, items, args.threads):
            result = bench(bundle, row["backend"], args.set, args.threads, args.runs)
            row |= {k: result[k] for k in ("wer", "rtf_wall", "rtf_cpu", "peak_rss_mb", "bundle_mb")}
            rows.append(row)
    print(
        f"{'bundle':24s} {'backend':8s} {'same text':>9s} {'max|Δlogit|':>12s} {'max|Δenc|':>10s} "
        f"{'WER%':>6s} {'RTF wall':>9s} {'RTF cpu':>8s} {'RSS MB':>7s} {'model MB':>9s}"
    )
    for r in rows:
        enc = "-" if r["max_encoder_diff"] is None else f"{r['max_encoder_diff']:.2e}"
        print(
            f"{r['bundle']:24s} {r['backend']:8s} {r['same_text']:>4d}/{r['n']:<4d} {r['max_logit_diff']:12.2e} "
            f"{enc:>10s} {r['wer']:6.2f} {r['rtf_wall']:9.4f} {r['rtf_cpu']:8.4f} {r['peak_rss_mb']:7d} "
            f"{r['bundle_mb']:9.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
