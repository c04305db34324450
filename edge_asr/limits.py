"""Bounds on the text a user gives the recognizer: hotwords, the prompt, the daemon's vocabulary, grammars.

Each is tokenized or compiled before the first window, so an input without bounds is a hang before any
audio is heard (a 100,000-character hotword took minutes in the tokenizer before its merge was made
O(n log n)). The bounds are far past any real use: Whisper reads at most 223 prompt tokens (about 1,000
characters), the longest English dictionary word has 45 letters, and a plant's vocabulary is tens of
names. Input past a bound is refused with one line that names it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

MAX_WORD_CHARS = 64  # a hotword or a grammar word
MAX_HOTWORD_CHARS = 200  # a hotword may be a phrase ("north conveyor drive belt")
MAX_HOTWORDS = 500
MAX_PROMPT_CHARS = 4000  # Whisper keeps the last 223 tokens of it
MAX_TEXT_FILE_BYTES = 1 << 20  # a hotwords or grammar file


def check_word(word: str, where: str) -> str:
    if len(word) > MAX_WORD_CHARS:
        raise InputError(f"{where}: the word {word[:20]!r}… is {len(word):,} characters; at most {MAX_WORD_CHARS}")
    return word


def check_hotwords(words: list[str], where: str = "hotwords") -> list[str]:
    if len(words) > MAX_HOTWORDS:
        raise InputError(f"{where}: {len(words):,} hotwords; at most {MAX_HOTWORDS}")
    for phrase in words:
        if len(phrase) > MAX_HOTWORD_CHARS:
            raise InputError(
                f"{where}: the hotword {phrase[:20]!r}… is {len(phrase):,} characters; at most {MAX_HOTWORD_CHARS}"
            )
        for word in phrase.split():
            check_word(word, where)
    return words


def check_prompt(prompt: str | None, where: str = "prompt") -> str | None:
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"{where}: {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}")
    return prompt


def read_text_file(path: str | Path, what: str) -> str:
    """A user's text file (UTF-8, at most MAX_TEXT_FILE_BYTES), or one line saying why not."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise InputError(f"{path}: the {what} is larger than {MAX_TEXT_FILE_BYTES >> 20} MB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: the {what} is not UTF-8 text") from None
