"""What transcribers return: a transcript made of timed segments. Both Whisper's and the LSTM-CTC
transcriber build these, and the writers, bench and daemon read them, so they sit below all of those."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Word:
    start: float  # seconds from the start of the audio
    end: float
    word: str
    confidence: float  # the model's probability of the word's characters (geometric mean)

    def to_dict(self) -> dict:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "word": self.word,
            "confidence": round(self.confidence, 3),
        }


@dataclass
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    text: str
    avg_logprob: float | None = None  # mean log-probability of its window's tokens (Whisper)
    no_speech_prob: float | None = None  # probability of <|nospeech|> at its window's first step (Whisper)
    temperature: float | None = None  # the decoding temperature that produced it (0: greedy or beam)
    compression_ratio: float | None = None
    words: list[Word] | None = None  # word times and confidences (LSTM-CTC)
    rule: str | None = None  # command mode: the grammar rule the phrase came from
    confidence: float | None = None  # command mode: the phrase's confidence (commands.CommandMode)

    def to_dict(self) -> dict:
        d = {
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in asdict(self).items()
            if v is not None and k != "words"
        }
        return d | ({"words": [w.to_dict() for w in self.words]} if self.words is not None else {})


@dataclass
class Transcript:
    text: str
    audio_seconds: float
    wall_seconds: float
    cpu_seconds: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def rtf(self) -> float:
        """Real-time factor: processing seconds per second of audio (below 1 is faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else 0.0

    @property
    def rtf_cpu(self) -> float:
        return self.cpu_seconds / self.audio_seconds if self.audio_seconds else 0.0
