"""Hotwords: domain words (machine names, part codes, suppliers) favoured in decoding without being forced.

For Whisper, two ways, both recorded in the bundle's decoding section:

- the words are named in the previous-text prompt (as faster-whisper's `hotwords` do). The prompt sways
  every word of a window, not only the hotwords, so a window decoded with it is kept only if it says one
  of them; otherwise the window is decoded again without it;
- a logit bonus. Each word is spelled as the token sequences it can appear as (after a space or at the
  start of a segment; as given, capitalized, lower-case), and at every step the decoder adds `bonus` to
  the tokens that start one of those sequences, or continue one whose beginning the text already ends
  with. Only the next token is favoured, so a word the audio does not support is not forced in: the bonus
  has to tip a close call.

The LSTM-CTC path biases characters the same way (see `ctc.WordBias`).
"""

from __future__ import annotations

import re

import numpy as np

from .limits import check_hotwords, read_text_file

# For Whisper bundles that record none; chosen on benchmarks/hotwords.py's tuning sets (see the README):
# naming the words in the prompt found more of them than any logit bonus, with no insertions.
DEFAULT_WHISPER_BONUS = 0.0  # logits per token
DEFAULT_WHISPER_PROMPT = True


def hotword_prompt(words: list[str]) -> str:
    """The words as Whisper's previous text: a list it has 'just heard', whose spellings it then prefers."""
    return ", ".join(words) + "."


def read_word_list(words: str | None = None, path: str | None = None) -> list[str]:
    """Hotwords from a comma-separated string and/or a file with one word or phrase per line ('#' starts a
    comment); `words` may also be @FILE (the form `--bias-words` took)."""
    found: list[str] = []
    files = [path] if path else []
    if words and words.startswith("@"):
        files, words = [words[1:], *files], None
    if words:
        found += [w.strip() for w in words.split(",") if w.strip()]
    for file in files:
        lines = read_text_file(file, "word list").splitlines()
        found += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    return check_hotwords(list(dict.fromkeys(found)), ", ".join(files) or "--hotwords")


def letters_and_digits(text: str) -> str:
    """`text` lower-cased without spaces, hyphens or punctuation: how a hotword is looked for ("KX 40" and
    "kx40" are both "KX-40")."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


def mentions(text: str, words: list[str] | tuple[str, ...]) -> bool:
    """Whether `text` says one of `words`, in any case, spacing or hyphenation."""
    flat = letters_and_digits(text)
    return any(letters_and_digits(w) in flat for w in words)


class TokenBias:
    def __init__(self, words: list[str], tokenizer, bonus: float):
        self.bonus = bonus
        self.starts: set[int] = set()  # first tokens, after a space or at a segment's start
        self.next: dict[tuple[int, ...], set[int]] = {}  # a sequence's beginning -> the tokens that continue it
        for word in words:
            for form in {word, word[:1].upper() + word[1:], word.lower()}:
                for sequence in (tokenizer.encode(" " + form), tokenizer.encode(form)):
                    self.starts.add(sequence[0])
                    for k in range(1, len(sequence)):
                        self.next.setdefault(tuple(sequence[:k]), set()).add(sequence[k])
        self.longest = max((len(p) for p in self.next), default=0)
        self._starts = np.fromiter(self.starts, dtype=np.int64)

    def apply(self, logits: np.ndarray, text_tokens: list[int]) -> None:
        """Add the bonus, in place, to the tokens that start or continue a hotword after `text_tokens`."""
        logits[self._starts] += self.bonus
        favoured: set[int] = set()
        for k in range(1, min(self.longest, len(text_tokens)) + 1):
            favoured |= self.next.get(tuple(text_tokens[-k:]), set())
        if favoured:
            logits[list(favoured)] += self.bonus
