"""Segment timestamps against known sentence boundaries, on synthesized multi-sentence dictation.

Each file strings together sentences spoken by piper, each trimmed to its speech, with pauses of
0.3-1.0 s between them (so the pause is where a boundary belongs). A boundary is on time when a segment
starts or ends within 0.5 s of its pause (inside the pause counts as 0). Also counted: segments per
sentence (Whisper may split a sentence at a comma, or join two).

    python benchmarks/timestamps.py [--bundle DIR] [--files 8] [--sentences 6] [--beam N]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from edge_asr.frontend import SAMPLE_RATE  # noqa: E402

TOLERANCE_S = 0.5


def trim(audio: np.ndarray, threshold_db: float = -45.0) -> np.ndarray:
    """The clip from its first to its last 10 ms frame above `threshold_db` dBFS."""
    n = len(audio) // 160
    db = 10 * np.log10(np.mean(audio[: n * 160].reshape(n, 160) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(db > threshold_db)
    return audio[loud[0] * 160 : (loud[-1] + 1) * 160]


def dictation(
    sentences: list[str], rng: np.random.Generator, synthesize
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Audio of the sentences with pauses, and each pause's (start, end) in seconds."""
    parts, pauses, t = [np.zeros(int(0.3 * SAMPLE_RATE), np.float32)], [], 0.3
    for i, text in enumerate(sentences):
        speech = trim(synthesize(text))
        parts.append(speech)
        t += len(speech) / SAMPLE_RATE
        pause = float(rng.uniform(0.3, 1.0))
        if i < len(sentences) - 1:
            pauses.append((t, t + pause))
        parts.append(np.zeros(int(pause * SAMPLE_RATE), np.float32))
        t += int(pause * SAMPLE_RATE) / SAMPLE_RATE
    return np.concatenate(parts), pauses


def boundary_errors(pauses: list[tuple[float, float]], segments) -> list[float]:
    """For each pause, the distance from it to the nearest segment start or end (0 inside it)."""
    times = [s.start for s in segments] + [s.end for s in segments]
    if not times:
        return [float("inf")] * len(pauses)
    return [min(max(a - t, 0.0, t - b) for t in times) for a, b in pauses]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=6)
    parser.add_argument("--beam", type=int, default=0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    import edge_asr
    from edge_asr.paths import bundle_dir
    from edge_asr.settings import DecodingSettings
    from edge_asr_build.speech.sentences import dictation_sentences
    from edge_asr_build.speech.synth import synthesize

    transcriber = edge_asr.load(args.bundle or bundle_dir(), 2, DecodingSettings(beam=args.beam, timestamps=True))
    texts = dictation_sentences(args.files * args.sentences, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    errors, n_segments, n_sentences = [], 0, 0
    print(f"{'file':>4s} {'audio_s':>7s} {'sentences':>9s} {'segments':>8s} {'on time':>8s} {'worst_s':>7s}")
    for f in range(args.files):
        sentences = texts[f * args.sentences : (f + 1) * args.sentences]
        audio, pauses = dictation(sentences, rng, synthesize)
        segments = transcriber.transcribe(audio).segments
        e = boundary_errors(pauses, segments)
        errors += e
        n_segments += len(segments)
        n_sentences += len(sentences)
        print(
            f"{f:4d} {len(audio) / SAMPLE_RATE:7.1f} {len(sentences):9d} {len(segments):8d} "
            f"{sum(x <= TOLERANCE_S for x in e):4d}/{len(e):<3d} {max(e):7.2f}"
        )
    on_time = sum(x <= TOLERANCE_S for x in errors)
    print(
        f"boundaries within {TOLERANCE_S} s: {on_time}/{len(errors)} ({100 * on_time / len(errors):.1f}%); "
        f"segments {n_segments} for {n_sentences} sentences ({n_segments / n_sentences:.2f} per sentence)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
