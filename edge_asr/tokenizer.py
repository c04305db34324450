"""Detokenization of Whisper's byte-level BPE from the bundle's token list (no tokenizer library)."""
from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE tokens are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    def __init__(self, tokens: list[str], special: dict[str, int]):
        self.tokens = tokens
        self.special = special
        self.eot = special["eot"]

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; special tokens (id >= eot) are dropped, invalid UTF-8 is replaced."""
        data = bytearray()
        for i in ids:
            if i < self.eot:
                data.extend(_BYTE_OF_CHAR[c] for c in self.tokens[i])
        return data.decode("utf-8", errors="replace")
