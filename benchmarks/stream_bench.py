#!/usr/bin/env python3
"""Streaming accuracy and latency on a long synthesized dictation stream.

Sentences written for it (never the evaluation sets) are spoken by the piper voice and joined by
pauses of 1.5 to 2.5 s into a stream of about --minutes minutes. We know where each sentence's speech
ends, because we assembled the stream. The script prints:

  * WER of each sentence transcribed alone: the reference point;
  * WER of the stream through the file source at full speed and at real-time pace;
  * dropped frames at real-time pace;
  * latency from each utterance's last speech sample to its final text, at real-time pace.

  python benchmarks/stream_bench.py --minutes 10 --min-silence 0.5

Add --soak MINUTES to replay the stream at full speed for that long and print RSS over time
(with --plot, a PNG); the 60-minute soak is `--soak 60 --skip-realtime`.

With --grammar FILE the stream is of that grammar's phrases instead (commands, picked at random), and
the recognizer runs in command mode: the latency of a command's final.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from edge_asr.frontend import SAMPLE_RATE  # noqa: E402


def build_stream(
    minutes: float, seed: int, phrases: list[str] | None = None
) -> tuple[np.ndarray, list[str], list[float]]:
    """(audio, sentences, stream time of each sentence's last speech sample); `phrases` instead of the
    written sentences, picked at random."""
    from edge_asr_build.speech.sentences import general_sentences
    from edge_asr_build.speech.synth import synthesize

    rng = np.random.default_rng(seed)
    parts, texts, ends, t = [np.zeros(SAMPLE_RATE, np.float32)], [], [], 1.0
    spoken = (phrases[i] for i in rng.integers(0, len(phrases), 10_000)) if phrases else general_sentences(10_000, seed)
    for text in spoken:
        if t > minutes * 60:
            break
        audio = synthesize(text)
        voiced = np.flatnonzero(np.abs(audio) > 0.01)
        pause = rng.uniform(1.5, 2.5)
        parts += [audio, np.zeros(int(pause * SAMPLE_RATE), np.float32)]
        texts.append(text)
        ends.append(t + voiced[-1] / SAMPLE_RATE)
        t += len(audio) / SAMPLE_RATE + pause
    return np.concatenate(parts), texts, ends


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


class ArraySource:
    """The stream replayed `repeats` times at full speed, in 100 ms blocks."""

    dropped_frames = 0

    def __init__(self, audio: np.ndarray, repeats: int):
        self.audio, self.repeats = audio, repeats

    def __iter__(self):
        for _ in range(self.repeats):
            for i in range(0, len(self.audio), 1600):
                yield self.audio[i : i + 1600]


def make_recognizer(transcriber, args):
    """Finals only (no partials): what a daemon does."""
    from edge_asr.endpointer import Endpointer
    from edge_asr.stream import StreamRecognizer
    from edge_asr.vad import make_vad

    return StreamRecognizer(transcriber, Endpointer(make_vad(args.vad), args.min_silence), None)


def run_stream(transcriber, source, args):
    recognizer = make_recognizer(transcriber, args)
    finals = [f for block in source for f in recognizer.feed(block)] + recognizer.finish()
    return [f for f in finals if f.text], recognizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="default: the default bundle")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--min-silence", type=float, default=0.5)
    parser.add_argument("--vad", default="energy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-realtime", action="store_true")
    parser.add_argument("--soak", type=float, default=0.0, help="minutes of audio for the RSS soak (0: none)")
    parser.add_argument("--plot", help="PNG of RSS over the soak")
    parser.add_argument("--grammar", help="command mode: a stream of this grammar's phrases, decoded under it")
    parser.add_argument(
        "--block",
        type=float,
        help="seconds of audio per block the source gives "
        "(default: the runtime's, as `edge-asr listen` reads a microphone)",
    )
    args = parser.parse_args()

    from edge_asr.metrics import word_error_rate
    from edge_asr.paths import bundle_dir
    from edge_asr.sources import FileSource
    from edge_asr.transcriber import Transcriber
    from edge_asr_build.speech.synth import write_wav

    transcriber = Transcriber(args.bundle or bundle_dir(), threads=args.threads, grammar=args.grammar)
    phrases = None
    if args.grammar:
        from edge_asr.grammar import Grammar

        phrases = Grammar.from_file(args.grammar).phrases(limit=1000)
    audio, texts, ends = build_stream(args.minutes, args.seed, phrases)
    wav = Path(f"/tmp/edge-asr-stream-{args.seed}-{args.minutes}{'-' + Path(args.grammar).stem if phrases else ''}.wav")
    write_wav(wav, audio)
    print(
        f"stream: {len(texts)} sentences, {len(audio) / SAMPLE_RATE / 60:.1f} min, min silence {args.min_silence} s, "
        f"{args.vad} VAD, {args.threads} threads",
        file=sys.stderr,
    )

    # Each sentence alone: cut exactly where it was put into the stream.
    starts = [0] + [int((e + 0.3) * SAMPLE_RATE) for e in ends[:-1]]
    alone = [transcriber.transcribe(audio[a : int((e + 0.3) * SAMPLE_RATE)]).text for a, e in zip(starts, ends)]
    rows = [("each sentence alone", word_error_rate([" ".join(texts)], [" ".join(alone)]), len(texts), 0, None)]

    blocks = {} if args.block is None else {"block_seconds": args.block}
    finals, rec = run_stream(transcriber, FileSource(str(wav), **blocks), args)
    rows.append(
        (
            "stream, full speed",
            word_error_rate([" ".join(texts)], [" ".join(f.text for f in finals)]),
            len(finals),
            0,
            rec.counters.rtf,
        )
    )
    latencies = []
    if not args.skip_realtime:
        source = FileSource(str(wav), realtime=True, **blocks)
        finals, rec = run_stream(transcriber, source, args)
        rows.append(
            (
                "stream, real time",
                word_error_rate([" ".join(texts)], [" ".join(f.text for f in finals)]),
                len(finals),
                source.dropped_frames,
                rec.counters.rtf,
            )
        )
        for f in finals:
            nearest = min(ends, key=lambda e: abs(e - f.last_speech_s))
            if abs(nearest - f.last_speech_s) < 0.5:
                latencies.append(f.emitted - (source.started + nearest))

    print(f"{'run':22} {'WER%':>6} {'finals':>7} {'dropped':>8} {'RTF':>7}")
    for name, wer, n, dropped, rtf in rows:
        print(f"{name:22} {wer:6.2f} {n:7d} {dropped:8d} {'' if rtf is None else f'{rtf:7.4f}'}")
    if latencies:
        q = np.percentile(latencies, [50, 90])
        print(
            f"latency, last speech sample -> final text (real time, {len(latencies)} utterances): "
            f"median {q[0]:.3f} s, p90 {q[1]:.3f} s, max {max(latencies):.3f} s "
            f"(min silence {args.min_silence} s; bound {0.5 + args.min_silence:.1f} s)"
        )

    if args.soak:
        repeats = max(1, round(args.soak * 60 / (len(audio) / SAMPLE_RATE)))
        recognizer = make_recognizer(transcriber, args)
        samples, next_mark, started = [], 0.0, time.monotonic()
        for block in ArraySource(audio, repeats):
            recognizer.feed(block)
            if recognizer.counters.audio_s >= next_mark:
                samples.append((recognizer.counters.audio_s / 60, rss_mb()))
                next_mark += 30
        samples.append((recognizer.counters.audio_s / 60, rss_mb()))
        after5 = [r for m, r in samples if m >= min(5.0, samples[-1][0] / 2)]  # short soaks: the second half
        growth = (max(after5) - after5[0]) / after5[0]
        print(
            f"soak: {samples[-1][0]:.0f} min of audio in {time.monotonic() - started:.0f} s, "
            f"{recognizer.counters.utterances} utterances"
        )
        print(f"{'audio min':>9} {'RSS MB':>8}")
        for m, r in samples[:: max(1, len(samples) // 13)]:
            print(f"{m:9.1f} {r:8.1f}")
        print(
            f"RSS growth after the first {min(5.0, samples[-1][0] / 2):.1f} minutes: {growth:+.1%} "
            f"(from {after5[0]:.1f} to max {max(after5):.1f} MB)"
        )
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.plot(*zip(*samples))
            ax.set_xlabel("audio minutes streamed (full speed)")
            ax.set_ylabel("RSS MB")
            ax.set_ylim(0, max(r for _, r in samples) * 1.2)
            ax.set_title("edge-asr streaming soak: resident memory")
            fig.tight_layout()
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
