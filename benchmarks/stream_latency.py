#!/usr/bin/env python3
"""First-partial latency of a streaming bundle, at real-time pace.

Clips from a folder with refs.tsv (short utterances: digits, commands) are joined by pauses of a faint
noise floor into one stream, which the file source plays at real-time pace in small blocks, as a
microphone would deliver it. We know each clip's place in the stream, and take its speech onset (end) to
be its first (last) 10 ms frame within 40 dB of its loudest. The script prints the medians over
utterances of the time from speech onset to the first non-empty partial; from the end of speech (the end
of the clip's last word) to the first partial that holds the clip's words correctly (normalized as WER
is); and from the end of speech to the final; then the stream's WER and RTF.

  python benchmarks/stream_latency.py ../shared/data/dev/fsdd --bundle ~/.cache/edge-asr/bundles/digits-lstm-int8 \\
      --clips 60 --block 0.02
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_asr.frontend import SAMPLE_RATE  # noqa: E402


def speech_frames(audio: np.ndarray, floor_db: float = 40.0) -> np.ndarray:
    """Indices of the clip's 10 ms frames within `floor_db` of its loudest frame."""
    n = len(audio) // 160
    energy = 10 * np.log10((audio[: n * 160].reshape(n, 160).astype(np.float64) ** 2).mean(1) + 1e-12)
    return np.flatnonzero(energy >= energy.max() - floor_db)


def onset(audio: np.ndarray) -> float:
    """Seconds into the clip of its first speech frame."""
    return float(speech_frames(audio)[0]) * 0.01


def offset(audio: np.ndarray) -> float:
    """Seconds into the clip of the end of its last speech frame."""
    return float(speech_frames(audio)[-1] + 1) * 0.01


def build_stream(folder: str, count: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    from edge_asr.bench import load_speech_set

    rng = np.random.default_rng(seed)
    items = load_speech_set(folder)
    chosen = [items[i] for i in sorted(rng.choice(len(items), min(count, len(items)), replace=False))]
    parts, clips, t = [], [], 0.0

    def pause(seconds):
        return rng.normal(0, 3e-4, int(seconds * SAMPLE_RATE)).astype(np.float32)

    parts.append(pause(1.0))
    t = 1.0
    for u in chosen:
        clips.append(
            {
                "reference": u.reference,
                "start": t,
                "onset": t + onset(u.audio),
                "offset": t + offset(u.audio),
                "end": t + len(u.audio) / SAMPLE_RATE,
            }
        )
        parts += [u.audio, pause(p := rng.uniform(1.0, 1.5))]
        t += len(u.audio) / SAMPLE_RATE + p
    return np.concatenate(parts), clips


def _holds(partial: list[str], words: list[str]) -> bool:
    """Whether the partial's words contain the reference's words in a row."""
    n = len(words)
    return any(partial[i : i + n] == words for i in range(len(partial) - n + 1)) if n else False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="folder with audio and refs.tsv")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--block", type=float, default=0.02, help="seconds per block the source delivers (default 0.02)")
    ap.add_argument("--min-silence", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beam", type=int, default=0)
    ap.add_argument("--hotwords", "--bias-words", dest="hotwords", help="comma-separated words to favour")
    args = ap.parse_args()

    import edge_asr
    from edge_asr.endpointer import Endpointer
    from edge_asr.hotwords import read_word_list
    from edge_asr.metrics import word_error_rate
    from edge_asr.settings import DecodingSettings
    from edge_asr.sources import FileSource
    from edge_asr.stream import StreamRecognizer
    from edge_asr.vad import EnergyVad
    from edge_asr_build.speech.synth import write_wav

    audio, clips = build_stream(args.folder, args.clips, args.seed)
    settings = DecodingSettings(beam=args.beam, hotwords=read_word_list(args.hotwords))
    transcriber = edge_asr.load(args.bundle, args.threads, settings)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "stream.wav"
        write_wav(wav, audio)
        source = FileSource(str(wav), realtime=True, block_seconds=args.block)
    partials, finals = [], []
    recognizer = StreamRecognizer(
        transcriber,
        Endpointer(EnergyVad(), min_silence=args.min_silence),
        0.5,
        on_partial=partials.append,
        on_final=finals.append,
    )
    print(
        f"{len(clips)} clips from {args.folder}, {len(audio) / SAMPLE_RATE:.1f} s stream at real-time pace, "
        f"{args.block * 1000:.0f} ms blocks, bundle {transcriber.bundle.manifest.name}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    for block in source:
        recognizer.feed(block)
    recognizer.finish()
    wall = time.perf_counter() - start

    from edge_asr.metrics import normalize

    first_partial, word_partial, to_final, missed, hyps = [], [], [], 0, []
    for clip in clips:
        window = (clip["start"] - 0.5, clip["end"])
        mine = [p for p in partials if window[0] <= p.start_s <= window[1]]
        done = [f for f in finals if window[0] <= f.start_s <= window[1]]
        hyps.append(" ".join(f.text for f in done))
        if done:
            to_final.append(done[0].emitted - source.started - clip["offset"])
        if not mine:
            missed += 1
            continue
        first_partial.append(min(p.emitted for p in mine) - source.started - clip["onset"])
        words = normalize(clip["reference"]).split()
        holding = [p.emitted for p in mine if _holds(normalize(p.text).split(), words)]
        if holding:
            word_partial.append(min(holding) - source.started - clip["offset"])

    def summary(values):
        ms = sorted(1000 * v for v in values)
        return (
            f"median {statistics.median(ms):.0f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.0f} ms, "
            f"max {ms[-1]:.0f} ms (n={len(ms)})"
        )

    refs = [c["reference"] for c in clips]  # scored per clip: the normalizer joins spoken digits into numbers
    c = recognizer.counters
    print(
        f"speech onset -> first non-empty partial:        {summary(first_partial)}; clips without a partial: {missed}"
    )
    print(
        f"end of speech -> partial holding its words:     {summary(word_partial)}; "
        f"clips whose partials never held them: {len(clips) - len(word_partial)}"
    )
    print(f"end of speech -> final:                         {summary(to_final)} (min-silence {args.min_silence:.2f} s)")
    print(
        f"stream WER {word_error_rate(refs, hyps):.2f}% (finals matched to clips by time), "
        f"{c.utterances} finals for {len(clips)} clips, "
        f"RTF {c.rtf:.4f} (processing {c.processing_s:.2f} s; wall {wall:.1f} s), "
        f"dropped frames {source.dropped_frames}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
