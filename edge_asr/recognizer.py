"""What every model family's recognizer offers (`Recognizer`), and the one public factory that makes the
right one for a bundle (`load`): Whisper's windowed `Transcriber`, or the streaming LSTM-CTC `CtcTranscriber`.

    import edge_asr
    recognizer = edge_asr.load("~/.cache/edge-asr/bundles/tiny.en-auto-22bb97e4-int8")
    print(recognizer.transcribe(audio).text)   # 16 kHz mono float32
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .bundle import Bundle
from .commands import CommandMode
from .context import ContextPolicy
from .ctc_transcriber import CtcTranscriber, decoding_options
from .grammar import GrammarError
from .guards import GuardCounters
from .results import Transcript
from .settings import DecodingSettings
from .transcriber import ShortWindowBeam, Transcriber, whisper_decoding


class Recognizer(Protocol):
    """A loaded model that turns audio into a timed transcript, whatever its family."""

    bundle: Bundle
    streaming: bool  # it also decodes a stream as it comes (`stream()`), with partials per character
    counters: GuardCounters | None  # events of the guards against text from silence and loops (Whisper)
    command: CommandMode | None  # the grammar of command mode, if on (Whisper)
    context: ContextPolicy | None  # how much audio the encoder sees per window (Whisper)

    def transcribe(self, audio: np.ndarray) -> Transcript: ...


def load(
    bundle: str | Path | Bundle,
    threads: int | None = None,
    settings: DecodingSettings | None = None,
    backend: str = "auto",
) -> Recognizer:
    """The recognizer a bundle's model family needs, Whisper's or the streaming LSTM-CTC one, on `backend`
    ("auto", "onnx", "ort" or "tflite"), decoding as `settings` ask (default: the bundle's own way): the one
    public factory, which the CLI, the live path, bench and the daemon use."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    settings = settings or DecodingSettings()
    command = None
    if settings.grammar:
        if bundle.family != "whisper":
            raise GrammarError(f"--grammar needs a Whisper bundle; {bundle.path.name} is {bundle.family}")
        if settings.hotwords:
            raise GrammarError("--grammar and hotwords do not mix: the grammar already says which words may come")
        command = CommandMode.load(settings.grammar, bundle, settings.grammar_threshold)
    if bundle.family == "lstm-ctc":
        options = decoding_options(
            settings.beam or 0, settings.hotwords, 1.0 if settings.hotword_bonus is None else settings.hotword_bonus
        )
        return CtcTranscriber(bundle, threads, options, backend)
    options, guards = whisper_decoding(bundle, settings, command)
    return Transcriber(
        bundle,
        threads,
        options,
        backend=backend,
        guards=guards,
        vad=settings.vad,
        seed=settings.seed,
        short_window_beam=ShortWindowBeam.recommended(bundle, settings),
        command=command,
    )
