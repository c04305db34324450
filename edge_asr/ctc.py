"""CTC decoding over characters: greedy, and prefix beam search with optional biasing toward a word list.

A CTC model emits, for every frame, log-probabilities over the alphabet plus a blank. A transcript is read
by collapsing repeated symbols and dropping blanks ("hh_e_ll_llo" -> "hello").

Biasing (for digits, commands, machine names) adds `bias` nats for every character of a word in the list,
counted on the words of a prefix: a word that stops matching the list loses its bonus again, so the list
steers the search without restricting it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .results import Word

BLANK = 0
ALPHABET = "_ abcdefghijklmnopqrstuvwxyz'"  # index 0 is the blank


def greedy_symbols(log_probs: np.ndarray, previous: int = BLANK) -> tuple[list[int], int]:
    """Collapsed non-blank symbols of frames (T, V), continuing after a frame whose best symbol was
    `previous`; also returns the last frame's best symbol, to continue from in the next chunk."""
    best = log_probs.argmax(axis=-1)
    out = []
    for s in best.tolist():
        if s != previous and s != BLANK:
            out.append(s)
        previous = s
    return out, previous


def greedy_words(log_probs: np.ndarray, alphabet: str, frame_seconds: float, offset_s: float = 0.0) -> list[Word]:
    """The greedy path's words with their times (first to last frame where one of their characters wins)
    and confidence (the geometric mean of their characters' probabilities where each was emitted)."""
    words, chars, logps, start, end, previous = [], [], [], 0, 0, BLANK

    def close():
        if chars:
            words.append(
                Word(
                    start * frame_seconds + offset_s,
                    (end + 1) * frame_seconds + offset_s,
                    "".join(chars),
                    float(np.exp(np.mean(logps))),
                )
            )
        chars.clear()
        logps.clear()

    for frame, symbol in enumerate(log_probs.argmax(-1)):
        symbol = int(symbol)
        if symbol != BLANK and symbol == previous and alphabet[symbol] != " ":
            end = frame  # the character holds on
        elif symbol != BLANK and symbol != previous:
            if alphabet[symbol] == " ":
                close()
            else:
                if not chars:
                    start = frame
                chars.append(alphabet[symbol])
                logps.append(float(log_probs[frame, symbol]))
                end = frame
        previous = symbol
    close()
    return words


def symbols_to_text(symbols: list[int], alphabet: str = ALPHABET) -> str:
    return " ".join("".join(alphabet[s] for s in symbols).split())


def _logaddexp(a: float, b: float) -> float:
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    return max(a, b) + float(np.log1p(np.exp(-abs(a - b))))


class WordBias:
    def __init__(self, words: list[str], bonus: float):
        self.words = {w.lower() for w in words}
        self.prefixes = {w[:i] for w in self.words for i in range(1, len(w) + 1)}
        self.bonus = bonus

    def score(self, text: str, final: bool) -> float:
        """Bonus of a prefix: complete words in the list, and a trailing partial word that starts one
        (at the end of the utterance only complete words count)."""
        words = text.split(" ")
        total = sum(len(w) for w in words[:-1] if w in self.words)
        last = words[-1]
        if last in self.words or (not final and last in self.prefixes):
            total += len(last)
        return self.bonus * total


def prefix_beam_search(
    log_probs: np.ndarray, beam: int = 8, alphabet: str = ALPHABET, bias: WordBias | None = None, prune: float = -12.0
) -> str:
    """The most probable collapsed transcript of frames (T, V) by CTC prefix beam search.

    Each prefix keeps two scores: ending in blank and ending in its last symbol, so that "aa" (two a's,
    a blank between) and "a" (one a, repeated frames) stay apart."""

    def total(item):
        text, (pb, pnb) = item
        return _logaddexp(pb, pnb) + (bias.score(text, False) if bias else 0.0)

    beams: dict[str, tuple[float, float]] = {"": (0.0, -np.inf)}
    for frame in log_probs:
        candidates = np.flatnonzero(frame >= max(prune, float(frame.max()) - 10.0))
        nxt: dict[str, list[float]] = defaultdict(lambda: [-np.inf, -np.inf])
        for text, (pb, pnb) in beams.items():
            p_all = _logaddexp(pb, pnb)
            for s in candidates.tolist():
                p = float(frame[s])
                if s == BLANK:
                    nxt[text][0] = _logaddexp(nxt[text][0], p_all + p)
                    continue
                char = alphabet[s]
                if char == " " and (not text or text.endswith(" ")):
                    # a space at the start or after a space does not change the transcript
                    nxt[text][0] = _logaddexp(nxt[text][0], p_all + p)
                    continue
                extended = text + char
                if text and text[-1] == char:
                    # a repeat only extends after a blank; without one it stays the same symbol
                    nxt[extended][1] = _logaddexp(nxt[extended][1], pb + p)
                    nxt[text][1] = _logaddexp(nxt[text][1], pnb + p)
                else:
                    nxt[extended][1] = _logaddexp(nxt[extended][1], p_all + p)
        beams = dict(sorted(((t, tuple(s)) for t, s in nxt.items()), key=total, reverse=True)[:beam])

    def final_score(item):
        text, (pb, pnb) = item
        return _logaddexp(pb, pnb) + (bias.score(text.strip(), True) if bias else 0.0)

    return " ".join(max(beams.items(), key=final_score)[0].split())
