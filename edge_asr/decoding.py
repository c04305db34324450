"""Greedy decoding in Whisper's no-timestamps mode, with Whisper's token suppression rules."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DecodingOptions:
    max_new_tokens: int = 224  # openai-whisper's sample_len: half the text context


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


def suppression_masks(decoder_config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Whisper's rules in no-timestamps mode, as boolean masks over the vocabulary: the tokens never emitted,
    and those never emitted first. `decoder_config` is a bundle's decoder section with n_vocab."""
    special = decoder_config["special_tokens"]
    # Never emitted: non-speech symbols, task/control tokens, and timestamps (no-timestamps mode).
    suppress = set(decoder_config["suppress_tokens"])
    suppress.update(special[k] for k in ("sot", "sot_prev", "sot_lm", "no_speech", "translate", "transcribe",
                                         "no_timestamps") if k in special)
    suppress_mask = np.zeros(decoder_config["n_vocab"], dtype=bool)
    suppress_mask[sorted(suppress)] = True
    suppress_mask[special["timestamp_begin"]:] = True
    # At the first position also the blank and end-of-text: an empty transcript is never the guess.
    first_mask = suppress_mask.copy()
    first_mask[list(decoder_config["suppress_blank"]) + [special["eot"]]] = True
    return suppress_mask, first_mask


class GreedyDecoder:
    def __init__(self, model, decoder_config: dict, options: DecodingOptions | None = None):
        self.model = model
        self.options = options or DecodingOptions()
        self.eot = decoder_config["special_tokens"]["eot"]
        self.prompt = list(decoder_config["prompt"])
        self.suppress_mask, self.first_mask = suppression_masks(decoder_config)

    def decode(self, mel: np.ndarray) -> list[int]:
        """Token ids (without prompt and end-of-text) for one 30 s window of log-mel features."""
        cross = self.model.encode(mel)
        logits, cache = self.model.decode(self.prompt, self.model.empty_cache(), cross)
        mask = self.first_mask
        tokens: list[int] = []
        # A backend with a fixed number of cache slots (TFLite) bounds the window's length too.
        for _ in range(min(self.options.max_new_tokens, self.model.max_tokens - len(self.prompt))):
            token = int(np.argmax(np.where(mask, -np.inf, logits)))
            if token == self.eot:
                break
            tokens.append(token)
            mask = self.suppress_mask
            logits, cache = self.model.decode([token], cache, cross)
        return tokens
