"""Streaming recognition: source blocks -> endpointer -> transcriber -> partial and final events.

For Whisper, a growing utterance is re-decoded every `partial_interval` seconds of audio; the words
that two successive partials agree on are reported as the stable prefix. At each endpoint the utterance
is decoded once more, and that final is what sinks record. A streaming model (LSTM-CTC, whose
transcriber has `stream()`) is instead fed each new block once, carrying its state: a partial is out as
soon as its characters are, and the final only adds the end of the utterance. Every partial and final
carries the wall-clock time it was produced, so that latency can be measured against the source's clock.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .audio import SAMPLE_RATE
from .endpointer import Endpointer, Utterance


@dataclass
class Partial:
    text: str
    stable: str
    start_s: float
    emitted: float = 0.0  # time.monotonic() when the text was ready


@dataclass
class Final:
    text: str
    start_s: float
    end_s: float
    last_speech_s: float
    processing_s: float
    emitted: float  # time.monotonic() when the text was ready
    forced_cut: bool = False
    words: list | None = None  # results.Word, times from the utterance's start (streaming LSTM-CTC finals)
    rule: str | None = None  # command mode: the grammar rule of the phrase
    confidence: float | None = None  # command mode: the phrase's confidence

    @property
    def rtf(self) -> float:
        return self.processing_s / max(1e-9, self.end_s - self.start_s)

    def to_dict(self) -> dict:
        d = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("emitted", "words") and not (k in ("rule", "confidence") and v is None)
        }
        d = {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()} | {"rtf": round(self.rtf, 4)}
        if self.words is not None:
            d["words"] = [
                w.to_dict() | {"start": round(self.start_s + w.start, 3), "end": round(self.start_s + w.end, 3)}
                for w in self.words
            ]
        return d


@dataclass
class Counters:
    audio_s: float = 0.0
    processing_s: float = 0.0
    utterances: int = 0
    partials: int = 0
    dropped_frames: int = 0
    latest: list = field(default_factory=list)

    @property
    def rtf(self) -> float:
        return self.processing_s / self.audio_s if self.audio_s else 0.0

    def to_dict(self) -> dict:
        return {
            "audio_s": round(self.audio_s, 2),
            "processing_s": round(self.processing_s, 3),
            "rtf": round(self.rtf, 4),
            "utterances": self.utterances,
            "partials": self.partials,
            "dropped_frames": self.dropped_frames,
            "latest": self.latest,
        }


def _common_prefix(a: str, b: str) -> str:
    words = []
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        words.append(x)
    return " ".join(words)


class StreamRecognizer:
    def __init__(
        self,
        transcriber,
        endpointer: Endpointer,
        partial_interval: float | None = 1.0,
        on_partial=lambda p: None,
        on_final=lambda f: None,
        keep_latest: int = 10,
    ):
        self.transcriber, self.endpointer = transcriber, endpointer
        self.partial_interval = partial_interval
        self.on_partial, self.on_final = on_partial, on_final
        self.counters = Counters()
        self.keep_latest = keep_latest
        self._last_partial_at = 0.0
        self._previous_partial = ""
        self.incremental = transcriber.streaming
        self._stream, self._fed = None, 0  # the streaming model's utterance in flight, and samples fed to it

    @property
    def in_speech(self) -> bool:
        return self.endpointer.in_speech

    def feed(self, block) -> list[Final]:
        self.counters.audio_s += len(block) / SAMPLE_RATE
        finals = [self._final(u) for u in self.endpointer.feed(block)]
        if self.incremental and self.endpointer.in_speech:
            self._advance(self.endpointer.current())
        elif self.partial_interval and self.endpointer.in_speech:
            current = self.endpointer.current()
            if len(current) / SAMPLE_RATE - self._last_partial_at >= self.partial_interval:
                self._partial(current)
        return finals

    def finish(self) -> list[Final]:
        """End of input: decode the utterance in flight."""
        return [self._final(u) for u in self.endpointer.flush()]

    def _timed(self, audio) -> tuple[str, float, dict]:
        """The text of `audio`, the seconds it took, and in command mode the phrase's rule and confidence."""
        start = time.perf_counter()
        transcript = self.transcriber.transcribe(audio)
        spent = time.perf_counter() - start
        self.counters.processing_s += spent
        command = {}
        if self.transcriber.command and transcript.segments:
            command = {"rule": transcript.segments[0].rule, "confidence": transcript.segments[0].confidence}
        return transcript.text, spent, command

    def _partial(self, audio) -> None:
        text, *_ = self._timed(audio)
        self._last_partial_at = len(audio) / SAMPLE_RATE
        self._emit_partial(text, len(audio))

    def _emit_partial(self, text: str, n_samples: int) -> None:
        partial = Partial(
            text,
            _common_prefix(self._previous_partial, text),
            self.endpointer.time_s - n_samples / SAMPLE_RATE,
            time.monotonic(),
        )
        self._previous_partial = text
        self.counters.partials += 1
        self.on_partial(partial)

    def _advance(self, current) -> None:
        """Feed the streaming model what the utterance gained since the last block."""
        start = time.perf_counter()
        if self._stream is None:
            self._stream, self._fed = self.transcriber.stream(), 0
        text = self._stream.accept(current[self._fed :])
        self._fed = len(current)
        self.counters.processing_s += time.perf_counter() - start
        if text and text != self._previous_partial:
            self._emit_partial(text, len(current))

    def _final_text(self, utterance: Utterance) -> tuple[str, float, dict]:
        """The final's text, the seconds it took, and its words where the stream gives them or its rule and
        confidence in command mode."""
        stream, fed = self._stream, self._fed
        self._stream, self._fed = None, 0
        if stream is None or utterance.forced:
            # A forced cut ends before what the stream was fed; its rest starts the next utterance.
            return self._timed(utterance.audio)
        # Cut at silence: what was fed is the utterance (plus at most its trailing silence); add the rest.
        start = time.perf_counter()
        stream.accept(utterance.audio[fed:])
        text = stream.finish()
        spent = time.perf_counter() - start
        self.counters.processing_s += spent
        return text, spent, {"words": stream.words}

    def _final(self, utterance: Utterance) -> Final:
        text, spent, extra = self._final_text(utterance) if self.incremental else self._timed(utterance.audio)
        final = Final(
            text,
            utterance.start_s,
            utterance.end_s,
            utterance.last_speech_s,
            spent,
            time.monotonic(),
            utterance.forced,
            **extra,
        )
        self._last_partial_at, self._previous_partial = 0.0, ""
        if text:
            self.counters.utterances += 1
            self.counters.latest = (self.counters.latest + [final.to_dict()])[-self.keep_latest :]
            self.on_final(final)
        return final
