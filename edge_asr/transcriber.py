"""Audio in, text out: frontend -> ONNX model -> decoder -> guards -> timed segments, timed for RTF.

Long audio is cut at pauses into windows of at most 30 s (or the bundle's longest context). Each window is
decoded once (greedy or beam search); the guards then drop it as no speech, or have it decoded again by
seeded sampling at rising temperatures when the result looks like a loop or is improbable.

A bundle may recommend beam search for short windows (`short_window_beam` in its manifest's decoding
section): the adapted dynamic-context model does, for windows of up to 5 s of audio. There the encoder is
cheap and a single word has no context to recover from a wrong first token, so a few beams pay off; longer
windows stay greedy. A width the user gives (`--beam`, 0 for greedy) applies to every window instead.

In command mode (`commands.CommandMode`) a window is decoded once, under the grammar, with no fallback:
its text is a phrase of the grammar, or `[unk]` when the grammar had to overrule the model too far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .backend import open_model
from .bundle import Bundle
from .commands import CommandMode
from .context import ContextPolicy
from .decoding import DecodingOptions, WindowDecoder, split_segments
from .errors import BundleError
from .frontend import HOP_LENGTH, SAMPLE_RATE, window_features
from .guards import GuardCounters, Guards, compression_ratio
from .hotwords import DEFAULT_WHISPER_BONUS, DEFAULT_WHISPER_PROMPT, TokenBias, hotword_prompt, mentions
from .results import Segment, Transcript
from .segmenter import split_at_pauses
from .settings import DecodingSettings
from .vad import make_vad, spectral_variation_db, speech_seconds

MIN_SPEECH_SECONDS = 0.06  # the voice activity gate passes a window with two speech frames (a tight digit has few)


class Transcriber:
    """Whisper's recognizer (an `edge_asr.Recognizer`): windows decoded whole, guarded, timed."""

    streaming = False  # windows are decoded whole; the live path re-decodes a growing utterance for partials

    def __init__(
        self,
        bundle: str | Path | Bundle,
        threads: int | None = None,
        options: DecodingOptions | None = None,
        backend: str = "auto",
        guards: Guards | None = None,
        vad: str = "energy",
        seed: int = 0,
        short_window_beam: ShortWindowBeam | None = None,
        command: CommandMode | None = None,
        grammar: str | Path | None = None,
    ):
        """`grammar`: a grammar file for command mode (`command`: one already compiled)."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        if self.bundle.family != "whisper":
            raise BundleError(
                f"{self.bundle.path.name} is a {self.bundle.family} bundle, not Whisper: load it with edge_asr.load()"
            )
        if grammar is not None and command is None:
            command = CommandMode.load(grammar, self.bundle)
        own_way = options is None
        if command is not None:
            options = replace(options or DecodingOptions(), **command.decoding)
        self.model = open_model(self.bundle, threads, backend)
        decoder_config = dict(self.bundle.manifest.decoder, n_vocab=self.bundle.manifest.model.dims["n_vocab"])
        self.decoder = WindowDecoder(self.model, decoder_config, options)
        if own_way and short_window_beam is None:  # the bundle's own way, as edge_asr.load's default
            short_window_beam = ShortWindowBeam.recommended(self.bundle, DecodingSettings())
        # Beam search on short windows, where the backend decodes beams (not LiteRT through tflite-runtime).
        self.short_decoder, self.short_samples = None, 0
        if short_window_beam and self.decoder.options.beam_size == 1 and hasattr(self.model, "decode_batch"):
            self.short_decoder = WindowDecoder(
                self.model, decoder_config, replace(self.decoder.options, beam_size=short_window_beam.beam_size)
            )
            self.short_samples = round(short_window_beam.max_seconds * SAMPLE_RATE)
        # With hotwords named in the prompt: the decoder for windows that say none of them (a grammar's words
        # in the prompt stay: every window is one of its phrases or [unk]).
        names_hotwords = options is not None and options.vocabulary_prompt and options.grammar is None
        self.plain_decoder = (
            WindowDecoder(self.model, decoder_config, replace(options, vocabulary_prompt=(), hotwords=None))
            if names_hotwords
            else None
        )
        self.tokenizer = self.bundle.tokenizer
        self.context = ContextPolicy.from_manifest(self.bundle.manifest)
        self.guards = guards or Guards.from_manifest(self.bundle.manifest)
        # The gate's detector: energy is computed per window; Silero is a model, loaded once.
        self.vad = make_vad(vad) if self.guards.vad_gate and vad != "energy" else vad
        self.seed = seed
        self.command = command
        self.counters = GuardCounters()

    def use_command(self, command: CommandMode | None) -> None:
        """Switch command mode to another grammar, or off (None), between windows: a menu's next screen."""
        self.command = command
        changes = command.decoding if command else {"grammar": None, "vocabulary_prompt": ()}
        self.decoder = self.decoder.with_options(**changes)
        if self.short_decoder:
            self.short_decoder = self.short_decoder.with_options(**changes)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe 16 kHz mono float32 audio of any length, in windows of at most 30 s (or the bundle's
        longest context) cut at pauses."""
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        max_samples = round(self.context.max_seconds * SAMPLE_RATE)
        segments = []
        for index, (a, b) in enumerate(split_at_pauses(audio, max_samples)):
            segments += self.transcribe_window(audio[a:b], a / SAMPLE_RATE, index)
        return Transcript(
            text=" ".join(s.text for s in segments),
            audio_seconds=len(audio) / SAMPLE_RATE,
            wall_seconds=time.perf_counter() - start_wall,
            cpu_seconds=time.process_time() - start_cpu,
            segments=segments,
        )

    def transcribe_window(self, audio: np.ndarray, offset: float = 0.0, index: int = 0) -> list[Segment]:
        """Segments of one window of audio (times from `offset`), padded to the length the bundle's context
        policy gives it; none if the guards find no speech in it."""
        if len(audio) < HOP_LENGTH:
            return []
        self.counters.windows += 1
        if self.guards.enabled and self.guards.vad_gate and speech_seconds(audio, self.vad) < MIN_SPEECH_SECONDS:
            self.counters.vad_skipped += 1
            return []
        decoder = self.decoder_for(len(audio))
        window = decoder.prefill(window_features(audio, self.bundle.mel_filters, self.context.frames(len(audio))))
        if self.guards.is_unvoiced(
            window.no_speech_prob,
            lambda: speech_seconds(audio) < MIN_SPEECH_SECONDS,
            lambda: spectral_variation_db(audio),
        ):
            self.counters.no_speech += 1
            return []
        if self.command:
            return self._command(decoder, window, offset, len(audio) / SAMPLE_RATE)
        rng = np.random.default_rng([self.seed, index])  # fallback sampling: the same audio, the same text
        decoded = self._decode_guarded(decoder, window, rng)
        if self.plain_decoder and (decoded is None or not mentions(decoded[1], self.decoder.options.vocabulary)):
            decoded = self._decode_guarded(self.plain_decoder, self.plain_decoder.prefill(cross=window.cross), rng)
        if decoded is None or (self.guards.enabled and not any(c.isalnum() for c in decoded[1])):
            self.counters.no_speech += 1  # punctuation alone (". ." from clicks) says no word
            return []
        return self._segments(*decoded, offset, len(audio) / SAMPLE_RATE)

    def decoder_for(self, samples: int) -> WindowDecoder:
        """The decoder of a window of `samples`: beams for a short one where the bundle recommends them,
        unless command mode's grammar is a word list (decoded greedily: see commands.py)."""
        if self.command and self.command.greedy:
            return self.decoder
        return self.short_decoder if self.short_decoder and samples <= self.short_samples else self.decoder

    def _decode_guarded(self, decoder: WindowDecoder, window, rng):
        """(result, text, compression ratio) of a window after the guards' fallback, or None for no speech."""
        attempts = []
        for temperature in self.guards.temperatures:
            result = decoder.decode(window, temperature, rng)
            text = self.tokenizer.decode(result.tokens).strip()
            ratio = compression_ratio(text)
            self.counters.loops_cut += result.looped
            attempts.append((result, text, ratio))
            if self.guards.is_no_speech(window.no_speech_prob, result.avg_logprob):
                return None
            if not self.guards.needs_fallback(result.avg_logprob, ratio, result.looped):
                return attempts[-1]
            self.counters.fallbacks += temperature != self.guards.temperatures[-1]
        # Every temperature failed a guard: the likeliest result that is not a loop.
        return max(
            attempts,
            key=lambda a: (not a[0].looped and a[2] <= self.guards.compression_ratio_threshold, a[0].avg_logprob),
        )

    def _command(self, decoder: WindowDecoder, window, offset: float, duration: float) -> list[Segment]:
        """The window's phrase or `[unk]`; nothing for a window without speech."""
        result = decoder.decode(window)
        self.counters.loops_cut += result.looped
        if self.guards.is_no_speech(window.no_speech_prob, result.avg_logprob):
            self.counters.no_speech += 1
            return []
        verdict = self.command.verdict(self.tokenizer.decode(result.tokens), result.grammar_gap, len(result.tokens))
        return [
            Segment(
                offset,
                offset + duration,
                verdict.phrase,
                avg_logprob=result.avg_logprob,
                no_speech_prob=result.no_speech_prob,
                temperature=0.0,
                rule=verdict.rule,
                confidence=verdict.confidence,
            )
        ]

    def _segments(self, result, text: str, ratio: float, offset: float, duration: float) -> list[Segment]:
        stats = dict(
            avg_logprob=result.avg_logprob,
            no_speech_prob=result.no_speech_prob,
            temperature=result.temperature,
            compression_ratio=ratio,
        )
        if not self.decoder.options.timestamps:
            return [Segment(offset, offset + duration, text, **stats)] if text else []
        segments = []
        for start, end, tokens in split_segments(result.tokens, self.decoder.timestamp_begin, duration):
            text = self.tokenizer.decode(tokens).strip()
            if text:
                segments.append(Segment(offset + start, offset + end, text, **stats))
        return segments


def whisper_decoding(
    bundle: Bundle, settings: DecodingSettings, command: CommandMode | None = None
) -> tuple[DecodingOptions, Guards]:
    """Decoding options and guards for a Whisper bundle from a user's settings: the bundle's recorded
    thresholds and hotword bonus unless the settings override them; `command`'s grammar if there is one."""
    recorded = bundle.manifest.decoding
    tokenizer = bundle.tokenizer
    prompt = tuple(tokenizer.encode(" " + settings.prompt.strip())) if settings.prompt else ()
    bias, named = None, ()
    if settings.hotwords:
        bonus = (
            settings.hotword_bonus
            if settings.hotword_bonus is not None
            else (DEFAULT_WHISPER_BONUS if recorded.hotword_bonus is None else recorded.hotword_bonus)
        )
        bias = TokenBias(settings.hotwords, tokenizer, bonus) if bonus else None
        in_prompt = (
            settings.hotword_prompt
            if settings.hotword_prompt is not None
            else (DEFAULT_WHISPER_PROMPT if recorded.hotword_prompt is None else recorded.hotword_prompt)
        )
        named = tuple(tokenizer.encode(" " + hotword_prompt(settings.hotwords))) if in_prompt else ()
    options = DecodingOptions(
        beam_size=max(1, settings.beam or 0),
        timestamps=settings.timestamps,
        prompt=prompt,
        vocabulary=tuple(settings.hotwords),
        vocabulary_prompt=named,
        hotwords=bias,
    )
    if command:
        options = replace(options, **command.decoding)
    return options, Guards.from_manifest(bundle.manifest).with_overrides(**settings.guards)


@dataclass(frozen=True)
class ShortWindowBeam:
    max_seconds: float  # windows with at most this much audio
    beam_size: int

    @classmethod
    def recommended(cls, bundle: Bundle, settings: DecodingSettings) -> ShortWindowBeam | None:
        """The bundle's recommendation, unless the user chose a beam width (0: greedy) for every window."""
        recorded = bundle.manifest.decoding.short_window_beam
        if settings.beam is not None or not recorded:
            return None
        return cls(float(recorded["max_seconds"]), int(recorded["beam_size"]))
