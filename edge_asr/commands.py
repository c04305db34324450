"""Command mode: decoding constrained to a grammar's phrases, and rejection of what is not one of them.

Decoding can only write a phrase of the grammar (`constraint.TokenGrammar`), so a sentence, a cough or a
near miss ("start line nine" where lines go to eight) would otherwise come out as the nearest phrase. At
each step the decoder also notes how much likelier the model's own choice was than the token the grammar
let it take (`DecodingResult.grammar_gap`, in nats, summed over the phrase's tokens and end-of-text). The
phrase's confidence is exp(gap / tokens), the geometric mean of those probability ratios: 1 where the
model would have written that phrase anyway, small where the grammar had to overrule it at every step.
Below the threshold the result is `[unk]`.

The grammar's words are also named in the previous-text prompt, as hotwords are (`hotwords.py`): a
model that has "just heard" them writes them where the audio allows. The prompt is paid for in every
window (LiteRT's decoder takes it 8 tokens a run, or a token at a time through the Interpreter API), so
it is short: the words once each, at most PROMPT_TOKENS. On the tuning voices (ONNX Runtime, with each
variant's threshold set to reject 90% of the non-commands), commands right and kept: no prompt 87 and 80
of 90; the words comma-separated, up to 100 tokens, 88 and 87; up to 16 tokens 85 and 79; space-separated
(31 tokens for the menu) 90 and 88.

A word list (a grammar each of whose words is a phrase by itself: digit strings, yes/no) is named as
sentences instead, "Zero. Oh. One. …", and decoded greedily. As a run of words the prompt read as a list
to continue, and the model repeated the digit it heard ("three three", at 0.61 against end-of-text's 0.33).
On the held-out digits (`benchmarks/short_clips.py`'s espeak-ng voices, 120 single digits), right of 120,
ONNX Runtime / LiteRT: words spaced, greedy 94 / 101, beams 75 / 99; as sentences, greedy 109 / 110, beams
102 / 109. As sentences, the menu's tuning commands fell from 85-88 to 71-79 of 90 (each word read as a
command of its own), so a grammar of phrases keeps the spaced words and the bundle's beams.

The mean, not the sum: on the tuning voices, the sum rejected correct commands that free decoding had
garbled over several words ("Can you make us lower?" for "conveyor slower") as readily as near misses,
whose one overruled word costs as much; per token, 92% of the commands decoded right were kept with 90%
of the non-commands rejected, against 88% for the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .grammar import UNKNOWN, Grammar

# For bundles whose decoding section records none; the build records it. Chosen by
# `benchmarks/commands.py --tune` on the tuning voices (espeak-ng en-us+m1 and en-gb+m3, piper's joe, and
# Kokoro's jf_nezumi, jf_tebukuro and jf_gongitsune styles; none in an evaluation set), 180 commands and 40
# non-commands, by one rule: the most commands kept while at least 95% of the non-commands are rejected
# on both backends. 0.27 kept 98.9% of the commands on both and rejected 100% (ONNX Runtime) and 97.5%
# (LiteRT); 0.25 rejected 92.5% on LiteRT; 0.3 kept 97.8% and 98.3%. (On the espeak-ng and piper voices
# alone, 0.25 and 0.3 had kept the same 97.8%, and 0.3 had been chosen.)
DEFAULT_REJECTION_THRESHOLD = 0.27
PROMPT_TOKENS = 32  # the grammar's words named in the prompt, at most this many tokens of them


@dataclass(frozen=True)
class Verdict:
    phrase: str  # the grammar's words, or "[unk]"
    rule: str | None  # the rule of root it came from (None for "[unk]")
    confidence: float


class CommandMode:
    def __init__(self, grammar: Grammar, tokenizer, threshold: float = DEFAULT_REJECTION_THRESHOLD):
        from .constraint import TokenGrammar

        self.grammar, self.threshold = grammar, threshold
        self.tokens = TokenGrammar(grammar, tokenizer)
        self.greedy = is_word_list(grammar)  # decoded greedily even where the bundle recommends beams
        self.prompt = named_words(grammar, tokenizer, as_sentences=self.greedy)

    @property
    def decoding(self) -> dict:
        """The decoding options command mode sets: the grammar, and its words in the prompt."""
        return {"grammar": self.tokens, "vocabulary_prompt": self.prompt}

    @classmethod
    def load(cls, path: str | Path, bundle, threshold: float | None = None) -> CommandMode:
        """A grammar file compiled over `bundle`'s tokenizer, with the rejection threshold given, else the
        bundle's, else the default."""
        recorded = bundle.manifest.decoding.grammar_threshold
        recorded = DEFAULT_REJECTION_THRESHOLD if recorded is None else recorded
        return cls(Grammar.from_file(path), bundle.tokenizer, recorded if threshold is None else threshold)

    def verdict(self, text: str, grammar_gap: float, tokens: int) -> Verdict:
        """The phrase `text` says (decoded under the grammar as `tokens` tokens), or `[unk]` if the grammar
        overruled the model by more than the threshold allows."""
        confidence = math.exp(min(0.0, grammar_gap) / (tokens + 1))  # end-of-text is a step too
        found = self.grammar.phrase_of(text)
        if found is None or confidence < self.threshold:
            return Verdict(UNKNOWN, None, confidence)
        return Verdict(found[0], found[1], confidence)


def is_word_list(grammar: Grammar) -> bool:
    """Whether each of the grammar's words is a phrase by itself (digit strings, yes/no; not spelled codes
    of 2 or more symbols, nor a menu)."""
    automaton = grammar.automaton
    first = automaton.closure([automaton.start])
    ending = automaton.ending()  # one pass, not a closure per word: a fuzzed grammar of 116,737 states took minutes
    alone = {word for state, word, after in automaton.words if state in first and after in ending}
    return all(word in alone for _, word, _ in automaton.words)


def named(grammar: Grammar) -> list[str]:
    """The grammar's words of 2 letters or more, in the order they first appear."""
    return list(dict.fromkeys(word for _, word, _ in grammar.automaton.words if len(word) > 1))


def named_words(grammar: Grammar, tokenizer, as_sentences: bool = False) -> tuple[int, ...]:
    """Tokens naming the grammar's words in the order they first appear ("start stop line one …", or
    "Zero. Oh. One. …" `as_sentences`), as many as fit in PROMPT_TOKENS. Letters and digits alone are not
    named: on the tuning voices' spelled codes, "a, b, c, …" in the prompt took the codes matched from 20
    to 16 of 30."""
    pieces, tokens = [], ()
    for word in named(grammar):
        piece = word.capitalize() + "." if as_sentences else word
        encoded = tuple(tokenizer.encode(" " + " ".join([*pieces, piece])))
        if len(encoded) > PROMPT_TOKENS:
            break
        pieces, tokens = [*pieces, piece], encoded
    return tokens
