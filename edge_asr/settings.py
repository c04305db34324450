"""What a user asks of decoding, in words rather than token ids: from flags or the daemon's [decoding]
section, for either model family. Each transcriber turns it into its own options."""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import check_hotwords, check_prompt


@dataclass
class DecodingSettings:
    beam: int | None = None  # None: the bundle's own way; 0 or 1: greedy; more: beam width
    prompt: str | None = None  # Whisper's previous-text prompt
    hotwords: list[str] = field(default_factory=list)
    hotword_bonus: float | None = None  # None: the bundle's (Whisper: logits per token; LSTM-CTC: nats per character)
    hotword_prompt: bool | None = None  # Whisper: also name the hotwords in the prompt (None: the bundle's)
    timestamps: bool = False  # Whisper: decode timestamp tokens (segments with their own times)
    guards: dict = field(default_factory=dict)  # overrides of guards.Guards: enabled, thresholds, vad_gate
    vad: str = "energy"  # the detector of the voice activity gate
    seed: int = 0  # of the guards' fallback sampling
    grammar: str | None = None  # Whisper: command mode, a grammar or phrase list file
    grammar_threshold: float | None = None  # its rejection threshold (None: the bundle's)

    def __post_init__(self):
        check_hotwords(self.hotwords)
        check_prompt(self.prompt)
