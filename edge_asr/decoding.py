"""Decoding one window of audio with Whisper.

1. **Prefill**: the previous-text prompt if there is one (`<|startofprev|>` and its tokens), then
   `<|startoftranscript|>`. The logits there give the probability of `<|nospeech|>`, which Whisper was
   trained to predict for windows without speech. Then the task tokens, and `<|notimestamps|>` unless
   segment timestamps are wanted.
2. **Tokens** until `<|endoftext|>`: greedy (temperature 0), sampled (temperature > 0, for the guards'
   fallback), or beam search, always under Whisper's rules (`TokenRules`): suppressed tokens, no empty
   transcript, timestamps in pairs and never going back; plus the hotword bias when one is given.
   With a grammar (command mode), only the tokens that continue one of its phrases may be chosen
   (`constraint.TokenGrammar`); log-probabilities stay the model's own, over all tokens, and the result
   says how many nats the grammar cost against the model's own choice at each step (`grammar_gap`).

Decoding stops early in a repetition loop (see `guards.loop_start`), keeping one copy of the repeated
span. A window's tokens, its summed log-probability and its no-speech probability are what the guards
and the segment timestamps are computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .errors import EdgeAsrError
from .guards import loop_start
from .hotwords import TokenBias

if TYPE_CHECKING:
    from .constraint import TokenGrammar

SECONDS_PER_TIMESTAMP = 0.02
MAX_INITIAL_TIMESTAMP = 1.0  # Whisper's: the first segment starts within the window's first second


@dataclass
class DecodingOptions:
    beam_size: int = 1  # 1: greedy; more: beam search (needs a backend that batches)
    timestamps: bool = False  # decode Whisper's timestamp tokens (segments with times)
    prompt: tuple[int, ...] = ()  # previous-text tokens (`--prompt`)
    vocabulary: tuple[str, ...] = ()  # the hotwords, as words
    vocabulary_prompt: tuple[int, ...] = ()  # tokens naming them after the prompt (see hotwords.py)
    hotwords: TokenBias | None = None  # their logit bonus, if any
    max_new_tokens: int = 224  # openai-whisper's sample_len: half the text context
    grammar: TokenGrammar | None = None  # command mode: only phrases of this grammar are written


@dataclass
class Prefilled:
    """A window after its prompt: what every decode of it starts from."""

    cross: list
    logits: np.ndarray
    cache: object
    length: int  # tokens in the prompt
    no_speech_prob: float


@dataclass
class DecodingResult:
    tokens: list[int]  # text and timestamp tokens, without <|endoftext|>
    sum_logprob: float
    no_speech_prob: float
    temperature: float
    looped: bool = False
    # With a grammar: the sum over steps of log p(chosen token) - max log p, both over all tokens (<= 0).
    grammar_gap: float = 0.0

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)  # as Whisper: <|endoftext|> counts


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def forced_decoding(model, mel: np.ndarray, prompt: list[int], tokens: list[int]):
    """Teacher-forced decoding of one window: the cross-attention inputs, the logits after the prompt and
    after each of `tokens` ((len(tokens) + 1, n_vocab)), and the cache after the last. What backends,
    exported graphs and compressed models are compared by."""
    cross = model.encode(mel)
    logits, cache = model.decode(prompt, model.empty_cache(), cross)
    steps = [logits]
    for token in tokens:
        logits, cache = model.decode([token], cache, cross)
        steps.append(logits)
    return cross, np.stack(steps), cache


def suppression_masks(decoder_config: dict, timestamps: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Whisper's suppression rules as boolean masks over the vocabulary: the tokens never emitted, and
    those never emitted first. `decoder_config` is a bundle's decoder section with n_vocab."""
    special = decoder_config["special_tokens"]
    # Never emitted: non-speech symbols and task/control tokens; timestamps too, unless they are wanted.
    suppress = set(decoder_config["suppress_tokens"])
    suppress.update(
        special[k]
        for k in ("sot", "sot_prev", "sot_lm", "no_speech", "translate", "transcribe", "no_timestamps")
        if k in special
    )
    suppress_mask = np.zeros(decoder_config["n_vocab"], dtype=bool)
    suppress_mask[sorted(suppress)] = True
    # Every control token between end-of-text and the timestamps: a multilingual model's language tokens too.
    suppress_mask[special["eot"] + 1 : special["timestamp_begin"]] = True
    if not timestamps:
        suppress_mask[special["timestamp_begin"] :] = True
    # At the first text position also the blank and end-of-text: an empty transcript is never the guess.
    first_mask = suppress_mask.copy()
    first_mask[list(decoder_config["suppress_blank"]) + [special["eot"]]] = True
    return suppress_mask, first_mask


class TokenRules:
    """What may come next, given the tokens decoded so far: Whisper's suppression and timestamp rules and
    the hotword bias, applied to one row of logits."""

    def __init__(self, decoder_config: dict, timestamps: bool, hotwords: TokenBias | None = None):
        special = decoder_config["special_tokens"]
        self.eot, self.timestamp_begin = special["eot"], special["timestamp_begin"]
        self.timestamps, self.hotwords = timestamps, hotwords
        self.suppress_mask, self.first_mask = suppression_masks(decoder_config, timestamps)
        self.max_initial = self.timestamp_begin + round(MAX_INITIAL_TIMESTAMP / SECONDS_PER_TIMESTAMP)

    def apply(self, logits: np.ndarray, sampled: list[int]) -> np.ndarray:
        logits = logits.astype(np.float32, copy=True)
        if self.hotwords:
            self.hotwords.apply(logits, [t for t in sampled if t < self.eot])
        # With timestamps the first token is one (the rules below), and an empty window may follow it.
        logits[self.first_mask if not sampled and not self.timestamps else self.suppress_mask] = -np.inf
        if self.timestamps:
            self._timestamp_rules(logits, sampled)
        return logits

    def _timestamp_rules(self, logits: np.ndarray, sampled: list[int]) -> None:
        """openai-whisper's ApplyTimestampRules."""
        begin = self.timestamp_begin
        if not sampled:  # a window starts with a timestamp, within its first second
            logits[:begin] = -np.inf
            logits[self.max_initial + 1 :] = -np.inf
            return
        last = sampled[-1] >= begin
        penultimate = len(sampled) < 2 or sampled[-2] >= begin
        if last:
            if penultimate:  # a segment has just begun: text follows
                logits[begin:] = -np.inf
            else:  # a segment has just ended: the next begins, or the window ends
                logits[: self.eot] = -np.inf
        stamps = [t for t in sampled if t >= begin]
        if stamps:  # time never goes back, and a segment is never empty
            floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
            logits[begin:floor] = -np.inf
        logprobs = log_softmax(logits)
        with np.errstate(divide="ignore"):
            timestamp_mass = np.log(np.exp(logprobs[begin:]).sum())
        if timestamp_mass > logprobs[:begin].max():  # a timestamp is likelier than any one text token
            logits[:begin] = -np.inf


class WindowDecoder:
    def __init__(self, model, decoder_config: dict, options: DecodingOptions | None = None):
        self.model, self.decoder_config = model, decoder_config
        self.options = options = options or DecodingOptions()
        special = decoder_config["special_tokens"]
        self.eot, self.sot, self.timestamp_begin = special["eot"], special["sot"], special["timestamp_begin"]
        self.no_speech = special.get("no_speech")
        # The task tokens after <|startoftranscript|>; <|notimestamps|> only when no timestamps are wanted.
        task = list(decoder_config["prompt"][1:])
        if options.timestamps:
            task = [t for t in task if t != special["no_timestamps"]]
        elif special["no_timestamps"] not in task:
            task.append(special["no_timestamps"])
        previous = (*options.prompt, *options.vocabulary_prompt)[-(model.max_tokens // 2 - 1) :]
        self.head = [special["sot_prev"], *previous] if previous else []
        self.head.append(self.sot)
        self.task = task
        self.rules = TokenRules(decoder_config, options.timestamps, options.hotwords)
        if options.grammar is not None and options.timestamps:
            raise EdgeAsrError("a grammar's phrases have no timestamps: leave out --timestamps with --grammar")
        if options.beam_size > 1 and not hasattr(model, "decode_batch"):
            raise EdgeAsrError(
                f"beam search needs a backend that decodes beams (onnx, ort, or tflite on ai-edge-litert), "
                f"not {model.backend}"
            )

    def with_options(self, **changes) -> WindowDecoder:
        """The same decoder with some options changed (`grammar=…` to switch command mode)."""
        return WindowDecoder(self.model, self.decoder_config, replace(self.options, **changes))

    @property
    def prompt(self) -> list[int]:
        return self.head + self.task

    def prefill(self, mel: np.ndarray | None = None, cross: list | None = None) -> Prefilled:
        """The window of `mel`, or of the encoder output `cross` another prefill already computed."""
        cross = self.model.encode(mel) if cross is None else cross
        # Read without the prompt: a grammar's words named there talked the model out of hearing noise as
        # noise (4 of 8 noise and silence clips got a phrase or [unk]; without it, none). Read first: a LiteRT
        # model keeps one cache, whose first slot the prompt then takes back.
        probe = None
        if self.no_speech is not None and self.options.grammar is not None and len(self.head) > 1:
            probe, _ = self.model.decode([self.sot], self.model.empty_cache(), cross)
        # With the probe read, nothing is read after the head: head and task go in as one run.
        together = probe is not None
        logits, cache = self.model.decode(
            self.head + self.task if together else self.head, self.model.empty_cache(), cross
        )
        no_speech_prob = 0.0
        if self.no_speech is not None:
            probe = logits if probe is None else probe
            no_speech_prob = float(np.exp(log_softmax(probe.astype(np.float32))[self.no_speech]))
        if self.task and not together:
            logits, cache = self.model.decode(self.task, cache, cross)
        return Prefilled(cross, logits, cache, len(self.head) + len(self.task), no_speech_prob)

    def decode(
        self, window: Prefilled, temperature: float = 0.0, rng: np.random.Generator | None = None
    ) -> DecodingResult:
        if self.options.beam_size > 1 and temperature == 0:
            return self._beam_search(window)
        return self._single_path(window, temperature, rng)

    def _limit(self, window: Prefilled) -> int:
        # A backend with a fixed number of cache slots (TFLite) bounds the window's length too.
        return min(self.options.max_new_tokens, self.model.max_tokens - window.length)

    def _loop_cut(self, sampled: list[int]) -> int | None:
        """Where to cut `sampled` if its text tokens end in a loop (timestamps never repeat, so they are
        left out of the comparison)."""
        if not sampled or sampled[-1] >= self.eot:
            return None
        positions = [i for i, t in enumerate(sampled) if t < self.eot]
        start = loop_start([sampled[i] for i in positions])
        return None if start is None else positions[start]

    def _allowed_only(self, logprobs: np.ndarray, sampled: list[int]) -> np.ndarray:
        """`logprobs` where the grammar allows the next token after `sampled`, -inf elsewhere."""
        allowed = self.options.grammar.allowed_after(sampled)
        kept = np.full_like(logprobs, -np.inf)
        kept[allowed] = logprobs[allowed]
        return kept

    def _single_path(self, window: Prefilled, temperature: float, rng) -> DecodingResult:
        logits, cache = window.logits, window.cache
        sampled: list[int] = []
        total, gap, looped = 0.0, 0.0, False
        for _ in range(self._limit(window)):
            row = self.rules.apply(logits, sampled)
            logprobs = log_softmax(row)
            choices = logprobs if self.options.grammar is None else self._allowed_only(logprobs, sampled)
            if temperature > 0:
                p = np.exp(choices / temperature - (choices / temperature).max())
                token = int(rng.choice(len(p), p=p / p.sum()))
            else:
                token = int(np.argmax(row if self.options.grammar is None else choices))
            total += float(logprobs[token])
            gap += float(logprobs[token] - logprobs.max())
            if token == self.eot:
                break
            sampled.append(token)
            cut = self._loop_cut(sampled)
            if cut is not None:
                sampled, looped = sampled[:cut], True
                break
            logits, cache = self.model.decode([token], cache, window.cross)
        return DecodingResult(
            sampled, total, window.no_speech_prob, temperature, looped, gap if self.options.grammar is not None else 0.0
        )

    def _beam_search(self, window: Prefilled) -> DecodingResult:
        """openai-whisper's beam search (patience 1, no length penalty: the best mean log-probability), with
        the beams run as one batch and the self-attention cache reordered to follow them. A beam is
        (tokens, summed log-probability, grammar gap)."""
        size, grammar = self.options.beam_size, self.options.grammar
        beams: list[tuple[list[int], float, float]] = [([], 0.0, 0.0)]
        finished: dict[tuple[int, ...], tuple[float, float]] = {}
        looped: set[tuple[int, ...]] = set()
        # The window's cross keys and values go in once, batch 1: the decoder broadcasts them over the beams.
        # Repeated per beam they were 17 MB for a 5 s window, the largest allocation of a short command.
        logits, cache, cross = window.logits[None], window.cache, window.cross
        for _ in range(self._limit(window)):
            logprobs = log_softmax(np.stack([self.rules.apply(row, seq) for row, (seq, *_) in zip(logits, beams)]))
            candidates = []
            for i, (seq, score, gap) in enumerate(beams):
                row = logprobs[i]
                if grammar is None:
                    top = np.argpartition(-row, size)[: size + 1]
                else:  # the best of the few dozen tokens the grammar allows, not a pass over the vocabulary
                    allowed = grammar.allowed_after(seq)
                    top = allowed[np.argsort(-row[allowed], kind="stable")[: size + 1]]
                best = float(row.max())
                candidates += [
                    (score + float(row[t]), i, int(t), gap + float(row[t]) - best) for t in top if row[t] > -np.inf
                ]
            candidates.sort(key=lambda c: -c[0])
            kept, sources = [], []
            for score, i, token, gap in candidates:
                seq = beams[i][0]
                if token == self.eot:
                    if len(finished) < size:
                        finished.setdefault(tuple(seq), (score, gap))
                    continue
                seq = seq + [token]
                cut = self._loop_cut(seq)
                if cut is not None:
                    finished.setdefault(tuple(seq[:cut]), (score, gap))
                    looped.add(tuple(seq[:cut]))
                    continue
                kept.append((seq, score, gap))
                sources.append(i)
                if len(kept) == size:
                    break
            if len(finished) >= size or not kept:
                break
            beams = kept
            cache = self.model.select_beams(cache, sources)  # each beam goes on from the cache of the one it extends
            logits, cache = self.model.decode_batch(np.array([[seq[-1]] for seq, *_ in beams]), cache, cross)
        if not finished:
            finished = {tuple(seq): (score, gap) for seq, score, gap in beams}
        best, (score, gap) = max(finished.items(), key=lambda item: item[1][0] / max(1, len(item[0])))
        return DecodingResult(
            list(best), score, window.no_speech_prob, 0.0, best in looped, gap if grammar is not None else 0.0
        )


def split_segments(tokens: list[int], timestamp_begin: int, duration: float) -> list[tuple[float, float, list[int]]]:
    """(start, end, text tokens) of each segment in a window decoded with timestamps: a segment is the text
    between a timestamp and the next. Text after the last timestamp ends with the window (`duration`)."""
    segments, start, text = [], 0.0, []
    for token in tokens:
        if token < timestamp_begin:
            text.append(token)
            continue
        time = (token - timestamp_begin) * SECONDS_PER_TIMESTAMP
        if text:
            segments.append((start, max(start, min(time, duration)), text))
            text = []
        start = min(time, duration)
    if text:
        segments.append((start, duration, text))
    return segments
