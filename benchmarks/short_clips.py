#!/usr/bin/env python3
"""Short commands on held-out speech: which decoding and which bundle recognize isolated words best.

Candidates for short clips are chosen here, never on dev sets. Two held-out sets, each written once as a
folder of WAVs with refs.tsv, so that `edge-asr bench` (and peers) read them like any other folder:

  digits        "zero" .. "nine", spoken by the espeak-ng voices the build's training never uses
                (`ESPEAK_HELD_OUT_VOICES`) at random rates and pitches, band-limited to telephone
                bandwidth (through 8 kHz) with noise at 20-35 dB SNR, cut tight with 0.1-0.3 s of pause
  smart-mirror  the wake-word benchmark's "smart mirror" recordings: real speakers, the keyword the
                build's recipe holds out (fetch Picovoice/wake-word-benchmark; --wake-words its audio/)

Then every bundle x decoding (--variant NAME='bench flags') is measured with `edge-asr bench --json`,
each in its own process, and a table printed: WER per set, the longest hypothesis in words, RTF wall.

  python benchmarks/short_clips.py --bundle ~/.cache/edge-asr/bundles/tiny.en-int8 \\
      --bundle ~/.cache/edge-asr/bundles/tiny.en-auto-22bb97e4-int8 --variant greedy= --variant beam5='--beam 5' \\
      --wake-words /work/.mirror/wake-word-benchmark/audio
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import run_ours  # noqa: E402

from edge_asr.frontend import SAMPLE_RATE  # noqa: E402

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_set(folder: Path, clips: list[tuple[str, np.ndarray, str]]) -> Path:
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for uid, audio, _ in clips:
        sf.write(folder / f"{uid}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    (folder / "refs.tsv").write_text("".join(f"{uid}\t{text}\n" for uid, _, text in clips), encoding="utf-8")
    return folder


def telephone(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Through 8 kHz and back (fsdd-like bandwidth), with white noise at 20-35 dB SNR."""
    import soxr

    audio = soxr.resample(soxr.resample(audio, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE).astype(np.float32)
    power = float(np.mean(audio**2)) or 1e-8
    noise = rng.normal(0, np.sqrt(power / 10 ** (rng.uniform(20, 35) / 10)), len(audio))
    return np.clip(audio + noise, -1, 1).astype(np.float32)


def digits_set(folder: Path, per_digit: int, seed: int) -> Path:
    from edge_asr_build.speech.synth import espeak
    from edge_asr_build.speech.training_audio import ESPEAK_HELD_OUT_VOICES, cut_tight

    if (folder / "refs.tsv").exists():
        return folder
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    clips = []
    for digit in DIGITS:
        for i in range(per_digit):
            audio = cut_tight(
                espeak(
                    digit, rng.choice(ESPEAK_HELD_OUT_VOICES), rate=rng.randrange(120, 200), pitch=rng.randrange(25, 75)
                )
            )
            lead, tail = (np.zeros(int(SAMPLE_RATE * rng.uniform(0.1, 0.3)), np.float32) for _ in range(2))
            clips.append((f"{digit}_{i}", telephone(np.concatenate([lead, audio, tail]), np_rng), digit))
    return write_set(folder, clips)


def wake_word_set(folder: Path, audio_dir: Path, count: int, seed: int) -> Path:
    from edge_asr.audio import load_audio

    if (folder / "refs.tsv").exists():
        return folder
    keyword = audio_dir / "smart mirror"
    files = sorted(p for p in keyword.iterdir() if p.suffix in (".wav", ".flac")) if keyword.is_dir() else []
    if not files:
        sys.exit(f"{audio_dir}: no 'smart mirror' folder of recordings (the wake-word benchmark's audio/)")
    chosen = random.Random(seed).sample(files, min(count, len(files)))
    return write_set(folder, [(f"mirror_{p.stem}", load_audio(p), "smart mirror") for p in chosen])


def longest(result: dict) -> int:
    return max((len(h.split()) for s in result["sets"].values() for h in s["hypotheses"].values()), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="a decoding to measure, as edge-asr bench flags (default: greedy=)",
    )
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--wake-words", type=Path, help="the wake-word benchmark's audio/ folder")
    ap.add_argument("--sets", type=Path, default=Path.home() / ".cache/edge-asr/held-out-short")
    ap.add_argument("--per-digit", type=int, default=12)
    ap.add_argument("--mirror", type=int, default=120)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()

    sets = {"digits": digits_set(args.sets / f"digits-{args.per_digit}-{args.seed}", args.per_digit, args.seed)}
    if args.wake_words:
        sets["smart-mirror"] = wake_word_set(
            args.sets / f"smart-mirror-{args.mirror}-{args.seed}", args.wake_words, args.mirror, args.seed
        )
    variants = [v.split("=", 1) for v in args.variant] or [["greedy", ""]]
    counts = ", ".join(f"{name} ({len(list(folder.glob('*.wav')))} clips)" for name, folder in sets.items())
    print(f"sets: {counts}; backend {args.backend}, {args.threads} threads\n")
    print("| bundle | decoding | " + " | ".join(f"{k} WER | {k} longest | {k} RTF" for k in sets) + " |")
    print("|---|---|" + "---|---|---|" * len(sets))
    for bundle in args.bundle:
        for name, flags in variants:
            cells = []
            for folder in sets.values():
                r = run_ours(
                    bundle, [str(folder)], args.threads, args.runs, ["--backend", args.backend, *shlex.split(flags)]
                )
                cells += [f"{r['wer']:.2f}", str(longest(r)), f"{r['rtf_wall']:.4f}"]
            print(f"| {Path(bundle).name} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
