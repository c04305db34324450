"""Guards against text nobody said: the no-speech gate, repetition loops, and when to fall back to
sampling at a higher temperature.

Whisper was trained on 30 s windows that nearly always held speech, so on silence or noise it still
writes something ("you", "."), and on hard audio it can fall into a loop that repeats a phrase until the
window's token budget is spent. Whisper's own transcribe guards against both; these guards follow it,
with thresholds chosen on held-out data:

- a window is **no speech** when the probability of `<|nospeech|>` at the first decoding step exceeds
  `no_speech_threshold` *and* the decoded tokens are improbable (mean log-probability below
  `logprob_threshold`): confident speech overrules the no-speech token. Above
  `certain_no_speech_threshold` the no-speech token decides alone: on 30 s of digital silence Whisper
  says "you" with confidence (-0.58 mean log-probability) while giving `<|nospeech|>` 0.94.
  Chosen on the held-out sets (370 utterances: synthesized, recorded, keywords, digits at 8 kHz) and
  synthesized non-speech (silence, white and pink noise, hum, music): speech scored at most 0.68 and
  non-speech at least 0.86. Whisper's 0.6 dropped a held-out sentence (0.61, -1.003);
- a window is also **no speech** when `<|nospeech|>` exceeds `unvoiced_no_speech_threshold` (0.5) and the
  energy detector finds under 0.06 s of speech in it (`vad.speech_seconds`: frames 12 dB above the window's
  quietest, clicks not counted). Both are evidence of another kind. Fuzzing found steady mixtures of tones
  (23 of 300) and isolated clicks (2 of 150) that the model reads as "Okay." or "I'm sorry." (no-speech
  0.52-0.70); on 162 held-out speech clips (150 tight telephone-band digits, 12 sentences) no-speech was at
  most 0.59 and the detector found at least 0.16 s of speech in every one;
- a window in which the energy detector finds no speech is also **no speech**, whatever `<|nospeech|>`
  says, when its spectrum is **steady** (`vad.spectral_variation_db` under `steady_spectrum_db`, 1 dB):
  fuzzing found a loud periodic buzz of 7 samples that the model read as a sentence at no-speech 0.48.
  Periodic buzzes from fuzz bytes stayed under 0.55 dB and tone mixtures mostly at 0; 400 held-out
  speechocean762 sentences varied by at least 10.4 dB clean, and by 4.8 dB in pink noise at -5 dB SNR;
- a result of **punctuation alone** (". ." from a few clicks, found by fuzzing) is no speech either: it
  says no word, so no transcript loses one;
- a result **needs fallback** when its text compresses too well (`compression_ratio_threshold`: a loop)
  or when the decoder was cut out of a loop; it is then decoded again by seeded sampling at the next
  temperature. Whisper also falls back when the tokens are merely improbable; on the held-out sets that
  changed 42 of 370 transcripts and raised WER from 32.96% to 34.25% (tiny.en's short utterances are
  improbable and right), so `fallback_logprob_threshold` is off unless a bundle or user sets it.

A bundle's manifest may record other thresholds (its `decoding` section); flags and the daemon's
configuration override them.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace

from .errors import BundleError
from .manifest import Manifest, ManifestError, conform_fields

TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# A loop: a span of text tokens repeated back to back at least MIN_REPEATS times, covering at least
# MIN_LOOP_TOKENS tokens ("the pump is hot" x3 is a loop; "check, check, check" is speech).
MIN_REPEATS = 3
MIN_LOOP_TOKENS = 12
MAX_LOOP_PERIOD = 48


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression: about 1.5 for speech, above 2.4 for a loop."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def loop_start(tokens: list[int]) -> int | None:
    """If `tokens` ends in a loop, the index where its second repetition starts (keeping one copy of the
    repeated span); otherwise None."""
    n = len(tokens)
    for period in range(1, min(MAX_LOOP_PERIOD, n // MIN_REPEATS) + 1):
        repeats = max(MIN_REPEATS, -(-MIN_LOOP_TOKENS // period))
        span = period * repeats
        if span > n or tokens[-1] != tokens[-1 - period]:  # the cheap test first: this runs every step
            continue
        tail = tokens[n - span :]
        if all(tail[i] == tail[i % period] for i in range(period, span)):
            start = n - span
            while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:  # where the repeating began
                start -= 1
            return start + period
    return None


@dataclass(frozen=True)
class Guards:
    enabled: bool = True
    no_speech_threshold: float = 0.7
    certain_no_speech_threshold: float = 0.8
    unvoiced_no_speech_threshold: float = 0.5
    steady_spectrum_db: float = 1.0
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    fallback_logprob_threshold: float | None = None
    temperatures: tuple[float, ...] = TEMPERATURES
    vad_gate: bool = False  # also skip windows in which the voice activity detector finds no speech

    @classmethod
    def off(cls) -> "Guards":
        """Decoding as it was before guards: greedy once, every window transcribed."""
        return cls(enabled=False, temperatures=(0.0,))

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "Guards":
        """The bundle's recorded thresholds; Whisper's defaults where it records none."""
        try:
            return conform_fields(cls, manifest.decoding.guards, "decoding.guards")
        except ManifestError as e:
            raise BundleError(f"{manifest.name}: malformed manifest: {e}") from None

    def with_overrides(self, **values) -> "Guards":
        """These guards with every value that is not None replaced (flags, the daemon's configuration)."""
        given = {k: v for k, v in values.items() if v is not None}
        if given.get("enabled") is False:
            return replace(self, **given, temperatures=(0.0,))
        return replace(self, **given)

    def to_dict(self) -> dict:
        return asdict(self) | {"temperatures": list(self.temperatures)}

    def is_no_speech(self, no_speech_prob: float, avg_logprob: float) -> bool:
        return self.enabled and (
            no_speech_prob > self.certain_no_speech_threshold
            or (no_speech_prob > self.no_speech_threshold and avg_logprob < self.logprob_threshold)
        )

    def is_unvoiced(self, no_speech_prob: float, unvoiced, variation_db) -> bool:
        """`unvoiced()`: whether the energy detector finds no speech; `variation_db()`: how much the window's
        spectrum changes (dB), asked only when the model leans to speech."""
        if not (self.enabled and unvoiced()):
            return False
        return no_speech_prob > self.unvoiced_no_speech_threshold or variation_db() < self.steady_spectrum_db

    def needs_fallback(self, avg_logprob: float, ratio: float, looped: bool) -> bool:
        improbable = self.fallback_logprob_threshold is not None and avg_logprob < self.fallback_logprob_threshold
        return self.enabled and (looped or ratio > self.compression_ratio_threshold or improbable)


@dataclass
class GuardCounters:
    """How often each guard acted, for `bench` and the daemon's status."""

    windows: int = 0
    no_speech: int = 0  # windows dropped by the no-speech gate
    vad_skipped: int = 0  # windows dropped by the voice activity gate
    fallbacks: int = 0  # re-decodes at a higher temperature
    loops_cut: int = 0  # decodes stopped in a repetition loop

    def to_dict(self) -> dict:
        return asdict(self)
