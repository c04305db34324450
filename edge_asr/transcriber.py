"""Audio in, text out: frontend -> ONNX model -> greedy decoder -> detokenizer, timed for RTF."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import open_model
from .bundle import Bundle
from .decoding import DecodingOptions, GreedyDecoder
from .context import ContextPolicy
from .frontend import HOP_LENGTH, SAMPLE_RATE, window_features
from .segmenter import split_at_pauses


@dataclass
class Transcript:
    text: str
    audio_seconds: float
    wall_seconds: float
    cpu_seconds: float

    @property
    def rtf(self) -> float:
        """Real-time factor: processing seconds per second of audio (below 1 is faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else 0.0

    @property
    def rtf_cpu(self) -> float:
        return self.cpu_seconds / self.audio_seconds if self.audio_seconds else 0.0


class Transcriber:
    def __init__(self, bundle: str | Path | Bundle, threads: int = 2, options: DecodingOptions | None = None,
                 backend: str = "auto"):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.model = open_model(self.bundle, threads, backend)
        decoder_config = dict(self.bundle.manifest["decoder"], n_vocab=self.bundle.manifest["model"]["dims"]["n_vocab"])
        self.decoder = GreedyDecoder(self.model, decoder_config, options)
        self.tokenizer = self.bundle.tokenizer
        self.context = ContextPolicy.from_manifest(self.bundle.manifest)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe 16 kHz mono float32 audio of any length, in windows of at most 30 s (or the bundle's
        longest context) cut at pauses."""
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        max_samples = round(self.context.max_seconds * SAMPLE_RATE)
        texts = [self.transcribe_window(audio[a:b]) for a, b in split_at_pauses(audio, max_samples)]
        return Transcript(
            text=" ".join(t for t in texts if t),
            audio_seconds=len(audio) / SAMPLE_RATE,
            wall_seconds=time.perf_counter() - start_wall,
            cpu_seconds=time.process_time() - start_cpu,
        )

    def transcribe_window(self, audio: np.ndarray) -> str:
        """Text of one window of audio, padded to the length the bundle's context policy gives it."""
        if len(audio) < HOP_LENGTH:
            return ""
        mel = window_features(audio, self.bundle.mel_filters, self.context.frames(len(audio)))
        return self.tokenizer.decode(self.decoder.decode(mel)).strip()


def load_transcriber(bundle: str | Path | Bundle, threads: int = 2, ctc_options=None, backend: str = "auto"):
    """The transcriber a bundle's model family needs, Whisper's or the streaming LSTM-CTC one, on `backend`
    ("auto", "onnx", "ort" or "tflite")."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if bundle.family == "lstm-ctc":
        from .ctc_transcriber import CtcTranscriber

        return CtcTranscriber(bundle, threads, ctc_options, backend)
    return Transcriber(bundle, threads, backend=backend)
