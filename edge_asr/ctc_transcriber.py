"""Audio in, text out for LSTM-CTC bundles, whole or as a stream: streaming log-mel -> stateful ONNX model
-> CTC decoder.

The model carries its state from one chunk to the next, so a stream costs the same per second however long
it runs, and a partial is ready as soon as the frames that hold a character have arrived. A whole file is
the same stream fed at once: both give the same frames, the same states and the same text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backend import open_model
from .bundle import Bundle
from .ctc import WordBias, greedy_symbols, greedy_words, prefix_beam_search, symbols_to_text
from .frontend import SAMPLE_RATE, LogMelStream
from .manifest import conform_fields
from .results import Segment, Transcript

# Silence fed after the last sample: a unidirectional model emits a character a few frames after it
# heard it, and the end of a file is not the end of what the model has to say.
TAIL_SECONDS = 0.3
# Silence fed before the first: every training utterance starts with 0.05-0.5 s of it, so a file cut
# tight at the onset of speech is given what the model knows to precede speech.
LEAD_SECONDS = 0.1


@dataclass
class CtcOptions:
    beam: int = 0  # 0: greedy; otherwise the prefix beam width for finals
    bias_words: list[str] = field(default_factory=list)
    bias: float = 1.0  # nats per character of a listed word


def decoding_options(beam: int = 0, bias_words: list[str] = (), bias: float = 1.0) -> CtcOptions | None:
    """Options from a user's settings (lower-cased word list); None when they ask for nothing, which keeps
    the bundle's defaults."""
    if not beam and not bias_words:
        return None
    return CtcOptions(beam=beam, bias_words=[w.lower() for w in bias_words], bias=bias)


class CtcTranscriber:
    """The streaming LSTM-CTC recognizer (an `edge_asr.Recognizer`): characters as the audio comes."""

    streaming = True
    counters = None  # no guards: CTC gives no text where it hears none
    command = None  # no command mode
    context = None  # no windows

    def __init__(
        self, bundle: str | Bundle, threads: int | None = None, options: CtcOptions | None = None, backend: str = "auto"
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.model = open_model(self.bundle, threads, backend)
        self.alphabet = self.bundle.manifest.tokenizer.alphabet
        self.options = options or conform_fields(
            CtcOptions, self.bundle.manifest.decoder.get("defaults", {}), "decoder.defaults"
        )
        self.bias = WordBias(self.options.bias_words, self.options.bias) if self.options.bias_words else None

    def stream(self) -> "CtcStream":
        return CtcStream(self)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe 16 kHz mono float32 audio of any length."""
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        stream = self.stream()
        stream.accept(audio)
        text = stream.finish()
        duration = len(audio) / SAMPLE_RATE
        return Transcript(
            text=text,
            audio_seconds=duration,
            wall_seconds=time.perf_counter() - start_wall,
            cpu_seconds=time.process_time() - start_cpu,
            segments=[Segment(0.0, duration, text, words=stream.words)] if text else [],
        )

    def decode(self, log_probs: np.ndarray) -> str:
        if self.options.beam or self.bias:
            return prefix_beam_search(log_probs, max(self.options.beam, 1), self.alphabet, self.bias)
        return symbols_to_text(greedy_symbols(log_probs)[0], self.alphabet)


class CtcStream:
    """One utterance, fed in blocks of any size: `accept` returns the greedy partial, `finish` the final."""

    def __init__(self, transcriber: CtcTranscriber):
        self.transcriber = transcriber
        self.model = transcriber.model
        self.features = LogMelStream(transcriber.bundle.mel_filters)
        self.state = self.model.initial_state()
        self.waiting = np.zeros((0, transcriber.bundle.mel_filters.shape[0]), dtype=np.float32)  # < stack frames
        self.log_probs: list[np.ndarray] = []
        self.symbols: list[int] = []
        self.previous = 0  # best symbol of the last frame, for CTC's collapse across chunks
        self.words = None  # after `finish`: the final's words with times and confidences
        self.accept(np.zeros(int(LEAD_SECONDS * SAMPLE_RATE), dtype=np.float32))

    @property
    def partial(self) -> str:
        return symbols_to_text(self.symbols, self.transcriber.alphabet)

    def accept(self, samples: np.ndarray) -> str:
        frames = np.concatenate([self.waiting, self.features.accept(samples)])
        usable = len(frames) - len(frames) % self.model.stack
        self.waiting = frames[usable:]
        if usable:
            log_probs, self.state = self.model.run(frames[:usable], self.state)
            self.log_probs.append(log_probs)
            new, self.previous = greedy_symbols(log_probs, self.previous)
            self.symbols += new
        return self.partial

    def finish(self) -> str:
        self.accept(np.zeros(int(TAIL_SECONDS * SAMPLE_RATE), dtype=np.float32))
        if not self.log_probs:
            return ""
        log_probs = np.concatenate(self.log_probs)
        text = self.transcriber.decode(log_probs)
        # Times from the greedy path: a beam final that reads otherwise has no frame-exact alignment here.
        words = greedy_words(log_probs, self.transcriber.alphabet, 0.01 * self.model.stack, -LEAD_SECONDS)
        self.words = words if " ".join(w.word for w in words) == text else None
        return text
