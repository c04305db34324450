"""`edge-asr demo`, the README's main job: build the default bundle (once), transcribe a synthesized sentence on
ONNX Runtime and LiteRT, measure the recognizer's peak RSS, then play a dictation through the live path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import edge_asr
from edge_asr.audio import load_audio
from edge_asr.endpointer import Endpointer
from edge_asr.paths import DEFAULT_BUNDLE, bundle_dir, home
from edge_asr.sources import FileSource
from edge_asr.stream import StreamRecognizer
from edge_asr.vad import EnergyVad
from edge_asr.writers import short_clock
from edge_asr_build.commands.whisper import build_bundle, has_formats
from edge_asr_build.speech.synth import synthesize, write_wav

DEMO_SENTENCE = "Replace the hydraulic filter on press number four before the night shift."
DEMO_FORMATS = "onnx,tflite"  # the demo shows both backends
DEMO_STREAM = [
    "The coolant pump on line two is running hot.",
    "Order a new drive belt for the north conveyor.",
    "Mark the inspection as done.",
]


def cmd_demo(args) -> int:
    """Build the default bundle once (cached), speak a sentence, transcribe it, report RTF."""
    default = bundle_dir(DEFAULT_BUNDLE)
    if not has_formats(default, DEMO_FORMATS):
        print(f"building the default bundle {DEFAULT_BUNDLE} (once; cached in {default})", file=sys.stderr)
        build_bundle("tiny.en", "int8", default, None, 12, args.threads, formats=DEMO_FORMATS, context="auto")
    wav = home() / "demo" / "maintenance.wav"
    if not wav.exists():
        wav.parent.mkdir(parents=True, exist_ok=True)
        write_wav(wav, synthesize(DEMO_SENTENCE))
    t = edge_asr.load(default, args.threads).transcribe(load_audio(wav))
    print(
        f"bundle:     {DEFAULT_BUNDLE} (tiny.en adapted to each window's length, int8; "
        f"`edge-asr build --context full` makes the 30 s model)"
    )
    print(f"audio:      {wav} ({t.audio_seconds:.2f} s, synthesized)")
    print(f"reference:  {DEMO_SENTENCE}")
    print(f"transcript: {t.text}")
    print(
        f"RTF:        {t.rtf:.3f} wall, {t.rtf_cpu:.3f} CPU ({t.wall_seconds * 1000:.0f} ms, {args.threads} threads, "
        f"ONNX Runtime)"
    )
    # the bundle's LiteRT model, as devices without ONNX Runtime run it
    lite = edge_asr.load(default, args.threads, backend="tflite").transcribe(load_audio(wav))
    print(
        f"LiteRT:     {lite.text}  (RTF {lite.rtf:.3f} wall, {lite.rtf_cpu:.3f} CPU; "
        + (
            "the same text as ONNX Runtime)"
            if lite.text == t.text
            else "its own int8 quantization: the text differs from ONNX Runtime's)"
        )
    )
    peak = _recognizer_peak_rss_mb(default, wav, args.threads)
    if peak:
        print(f"memory:     peak RSS {peak:.0f} MB (a process that only loads the bundle and transcribes the clip)")
    _demo_stream(default, args.threads, home() / "demo")
    return 0


_PEAK_RSS_CHILD = """import sys
from edge_asr.audio import load_audio
import edge_asr
edge_asr.load(sys.argv[1], int(sys.argv[2])).transcribe(load_audio(sys.argv[3]))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _recognizer_peak_rss_mb(bundle: Path, wav: Path, threads: int) -> float | None:
    """Peak RSS of a process that only loads `bundle` and transcribes `wav` (this one also built and
    synthesized); None where that cannot be measured (no /proc)."""
    if not Path("/proc/self/status").exists():
        return None
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_CHILD, str(bundle), str(threads), str(wav)],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(done.stdout.split()[-1]) / 1024 if done.returncode == 0 and done.stdout.strip() else None


def _demo_stream(bundle: Path, threads: int, folder: Path) -> None:
    """Live: three dictated sentences with pauses, played at real-time pace through the streaming path."""
    wav = folder / "stream.wav"
    if not wav.exists():
        pause = np.zeros(24000, dtype=np.float32)
        write_wav(wav, np.concatenate([pause] + [x for text in DEMO_STREAM for x in (synthesize(text), pause)]))
    source = FileSource(str(wav), realtime=True)

    def on_final(f):
        print(
            f"  [{short_clock(f.start_s)} - {short_clock(f.end_s)}] {f.text}  "
            f"(final {f.emitted - source.started - f.last_speech_s:.2f} s after speech ended, RTF {f.rtf:.3f})"
        )

    print(f"live:       {wav} as a real-time stream ({source.duration_s:.1f} s), min silence 0.5 s")
    recognizer = StreamRecognizer(
        edge_asr.load(bundle, threads), Endpointer(EnergyVad(), min_silence=0.5), None, on_final=on_final
    )
    for block in source:
        recognizer.feed(block)
    recognizer.finish()
    c = recognizer.counters
    print(f"            {c.utterances} utterances, RTF {c.rtf:.3f}, {source.dropped_frames} dropped frames")
