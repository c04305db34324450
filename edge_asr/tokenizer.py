"""Whisper's byte-level BPE from the bundle's token list, both ways (no tokenizer library).

Whisper's vocabulary is GPT-2's, whose merge ranks are the token ids themselves (tiktoken's
`mergeable_ranks`): encoding merges, again and again, the adjacent pair whose merged token has the
lowest id. Text is first split into words, numbers and punctuation by GPT-2's pattern, so a merge never
crosses a word boundary.
"""

from __future__ import annotations

import re

# GPT-2's pattern (`regex` syntax): ' ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+' for letters, numbers, the rest.
# The standard library has no \p{…}; these classes are the same sets written with \w, \d and _ (a device
# install need not carry the `regex` package). Numbers are decimal digits: '²' or 'Ⅻ' would split otherwise.
_PIECES = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE tokens are spelled in."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_CHAR_OF_BYTE = _bytes_to_unicode()
_BYTE_OF_CHAR = {c: b for b, c in _CHAR_OF_BYTE.items()}


class Tokenizer:
    def __init__(self, tokens: list[str], special: dict[str, int]):
        self.tokens = tokens
        self.special = special
        self.eot = special["eot"]
        self.timestamp_begin = special.get("timestamp_begin", len(tokens))
        self._ids: dict[str, int] | None = None  # built on first encode: decoding alone never needs it

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; special tokens (id >= eot) are dropped, invalid UTF-8 is replaced."""
        data = bytearray()
        for i in ids:
            if i < self.eot:
                data.extend(_BYTE_OF_CHAR[c] for c in self.tokens[i])
        return data.decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens), as Whisper's tokenizer gives them."""
        if self._ids is None:
            self._ids = {t: i for i, t in enumerate(self.tokens[: self.eot])}
        ids = []
        for piece in _PIECES.findall(text):
            ids += self._merge("".join(_CHAR_OF_BYTE[b] for b in piece.encode("utf-8")))
        return ids

    def _merge(self, word: str) -> list[int]:
        parts = list(word)
        while len(parts) > 1:
            ranks = [self._ids.get(a + b) for a, b in zip(parts, parts[1:])]
            best = (
                min((r, i) for i, r in enumerate(ranks) if r is not None) if any(r is not None for r in ranks) else None
            )
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self._ids[p] for p in parts]
