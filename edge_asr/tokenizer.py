"""Whisper's byte-level BPE from the bundle's token list, both ways (no tokenizer library).

Whisper's vocabulary is GPT-2's, whose merge ranks are the token ids themselves (tiktoken's
`mergeable_ranks`): encoding merges, again and again, the adjacent pair whose merged token has the
lowest id. Text is first split into words, numbers and punctuation by GPT-2's pattern, so a merge never
crosses a word boundary.
"""

from __future__ import annotations

import heapq
import re

import numpy as np

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
BYTE_ALPHABET = frozenset(_BYTE_OF_CHAR)  # the characters tokens are spelled in


class Tokenizer:
    def __init__(self, tokens: list[str], special: dict[str, int]):
        self.tokens = tokens
        self.special = special
        self.eot = special["eot"]
        self.timestamp_begin = special.get("timestamp_begin", len(tokens))
        self._ids: TokenIds | None = None  # built on first encode: decoding alone never needs it

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
            self._ids = TokenIds(self.tokens, self.eot)
        ids = []
        for piece in _PIECES.findall(text):
            ids += self._merge("".join(_CHAR_OF_BYTE[b] for b in piece.encode("utf-8")))
        return ids

    def _merge(self, word: str) -> list[int]:
        """Merge the adjacent pair of lowest rank (the leftmost of equals) until none is a token: a heap of
        candidate pairs over a linked list of parts, O(n log n) in the word's length. (Rescanning every pair
        after each merge is quadratic: a 20,000-character word took 31 s.)"""
        parts = list(word)  # parts[i]: the part starting at character i; "" once merged into its left neighbour
        after = list(range(1, len(parts) + 1))  # the start of the next part
        before = list(range(-1, len(parts) - 1))
        heap = []

        def push(i: int) -> None:
            j = after[i]
            if j < len(parts):
                rank = self._ids.get(parts[i] + parts[j])
                if rank is not None:
                    heapq.heappush(heap, (rank, i, parts[i], parts[j]))

        for i in range(len(parts) - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = after[i] if parts[i] else len(parts)
            if parts[i] != left or j >= len(parts) or parts[j] != right:
                continue  # a pair one of whose parts has been merged since it was pushed
            parts[i], parts[j] = left + right, ""
            after[i] = after[j]
            if after[i] < len(parts):
                before[after[i]] = i
            if before[i] >= 0:
                push(before[i])
            push(i)
        return [self._ids.get(p) for p in parts if p]  # every single byte's character is a token


class TokenIds:
    """Token string -> id, without a dict: a dict of Whisper's 50k text tokens held 3.4 MB, which command
    mode's peak could not spare. The strings' hashes sorted, and the ids in that order, hold 0.6 MB; a
    lookup is a bisection, then a comparison of the strings (hashes may collide)."""

    def __init__(self, tokens: list[str], count: int):
        """The first `count` of `tokens` (the text tokens; the list is kept, not copied)."""
        hashes = np.fromiter((hash(tokens[i]) for i in range(count)), dtype=np.int64, count=count)
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._ids = hashes[order], order.astype(np.int32)
        self._tokens = tokens

    def get(self, text: str) -> int | None:
        key = hash(text)
        i = int(np.searchsorted(self._hashes, key))
        while i < len(self._hashes) and self._hashes[i] == key:
            token = int(self._ids[i])
            if self._tokens[token] == text:
                return token
            i += 1
        return None
