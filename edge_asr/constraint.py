"""A grammar over a bundle's tokens: which tokens may come next, so that decoding can only write a phrase.

The word automaton (`grammar.WordAutomaton`) becomes a character automaton in the spellings Whisper writes:
each word in each of its spellings (`grammar.word_spellings`) in lower case, capitalized or in capitals
("start", "Start", "START"), words joined by a space, optionally after punctuation (", " ". "), an
optional space before the first word and optional punctuation after the last. One-character words may
also be written the ways Whisper writes a spelled code: digits back to back and a digit beside a single
letter ("452", "B73X"), or joined by hyphens ("K-2-D-E-G"). Letters do not run together: "and" or "FAR"
is a word, not a spelled a-n-d (allowed, capital runs let "FAR" through for a spoken "4, X"). Mixed case
is not a spelling: allowed, it let decoding wander into pieces such as "suPERVISOR" that the model finds
improbable, which cost the right phrase its confidence.

A token may continue the text when its characters walk the character automaton without falling off it.
Every token of the vocabulary is tried that way at once, through the token strings sorted (the tokens that
begin with a prefix are one run, found by bisection) walked beside the automaton: a branch ends where
either does, so a state costs as many steps as there are token prefixes it allows, not a pass over
51,864 tokens. The automaton is determinized lazily (sets of
character states), and each state's allowed tokens are computed once and kept: a grammar is compiled once
per bundle, and a state is paid for the first time a decode reaches it. End-of-text is allowed only where
a phrase may end.
"""

from __future__ import annotations

import array
import bisect
import re
import weakref
from collections.abc import Sequence

import numpy as np

from .grammar import Grammar, word_spellings

_SEPARATOR_PUNCTUATION = ",.;:!?"
_FINAL_PUNCTUATION = ".!?,"
_DIGITS, _LETTERS = "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# After a one-character word of each kind, the characters that may follow at once as the next one.
_JOINED = {"digit": _DIGITS + _LETTERS, "letter": _DIGITS}
_ASCII_TOKEN = re.compile(r"[Ġ!-~]+")  # GPT-2's byte alphabet: printable ASCII as itself, the space as Ġ


class SpokenForms:
    """The character automaton of a grammar's phrases as Whisper may write them, built as it is walked.

    Its states are tuples over the word automaton's states q: ("start",); ("before", q), where a word may
    begin; ("in", q, spelling, i), i characters into a spelling of a word that leads to q; ("after", q),
    just after a word; ("digit", q) and ("letter", q), just after a one-character word, where the next one
    may follow at once: after a digit any, after a letter a digit ("452", "B73X"); ("hyphen", q),
    after a hyphen that joins one-character words ("K-2"); ("punct", q), after punctuation between words;
    ("end",), after the final punctuation.
    Nothing is built ahead: a grammar of 1,000 phrases has tens of thousands of such states, and a decode
    visits a few dozen."""

    def __init__(self, grammar: Grammar):
        words = self.words = grammar.automaton
        self.word_start, self.accept = words.start, words.accept
        reaches_accept = words.reaching_accept()
        # A word that leads nowhere is no spelling of a phrase.
        self.words_from = {
            a: kept
            for a, edges in words.words_from.items()
            if (kept := [(word, b) for word, b in edges if b in reaches_accept])
        }
        self.spellings = {
            word: sorted({case for form in word_spellings(word) for case in (form, form.capitalize(), form.upper())})
            for word, _ in (w for ws in self.words_from.values() for w in ws)
        }
        self._closures: dict[int, tuple[int, ...]] = {}
        self._starts: dict[int, dict[str, list[tuple[int, str]]]] = {}
        self._singles: dict[int, dict[str, list[int]]] = {}
        self.start = self.closure([("start",), ("before", words.start)])

    def _word_closure(self, q: int) -> tuple[int, ...]:
        if q not in self._closures:
            self._closures[q] = tuple(sorted(self.words.closure([q])))
        return self._closures[q]

    def closure(self, states) -> frozenset:
        """`states` and what their empty moves reach: a word state's empty edges, and a one-character word's
        end being a word's end too."""
        done = set()
        for state in states:
            kind = state[0]
            if kind in _JOINED or kind in ("before", "after", "hyphen"):
                # Only the word states where something can happen are kept: where a word starts, or the end.
                reached = [q for q in self._word_closure(state[1]) if q in self.words_from or q == self.accept]
                done.update((kind, q) for q in reached if kind == "after" or q in self.words_from)
                if kind in _JOINED:
                    done.update(("after", q) for q in reached)
            else:
                done.add(state)
        return frozenset(done)

    def moves(self, state: tuple, c: str) -> list[tuple]:
        kind = state[0]
        if kind == "start":
            return [("before", self.word_start)] if c == " " else []
        if kind == "before":
            return [self._spelled(b, spelling, 1) for b, spelling in self._first_chars(state[1]).get(c, ())]
        if kind == "in":
            _, b, spelling, i = state
            return [self._spelled(b, spelling, i + 1)] if spelling[i] == c else []
        if kind in _JOINED:
            if c == "-":
                return [("hyphen", state[1])] if self._one_character_firsts(state[1]) else []
            if c not in _JOINED[kind]:
                return []
            return [self._spelled(b, c, 1) for b in self._one_character_firsts(state[1]).get(c, ())]
        if kind == "hyphen":
            return [self._spelled(b, c, 1) for b in self._one_character_firsts(state[1]).get(c, ())]
        if kind == "after":
            q, found = state[1], []
            if q in self.words_from:
                if c == " ":
                    found.append(("before", q))
                elif c in _SEPARATOR_PUNCTUATION:
                    found.append(("punct", q))
            if q == self.accept and c in _FINAL_PUNCTUATION:
                found.append(("end",))
            return found
        if kind == "punct":
            return [("before", state[1])] if c == " " else []
        return []

    def _first_chars(self, q: int) -> dict[str, list[tuple[int, str]]]:
        """{first character: [(state after the word, spelling), …]} of the words from word state q."""
        if q not in self._starts:
            index: dict[str, list[tuple[int, str]]] = {}
            for word, b in self.words_from.get(q, ()):
                for spelling in self.spellings[word]:
                    index.setdefault(spelling[0], []).append((b, spelling))
            self._starts[q] = index
        return self._starts[q]

    def _one_character_firsts(self, q: int) -> dict[str, list[int]]:
        """{character: [state after it, …]} of the one-character words (digits, letters) from word state q."""
        if q not in self._singles:
            self._singles[q] = {
                c: after
                for c, ends in self._first_chars(q).items()
                if (after := [b for b, spelling in ends if len(spelling) == 1])
            }
        return self._singles[q]

    @staticmethod
    def _spelled(b: int, spelling: str, i: int) -> tuple:
        if i < len(spelling):
            return ("in", b, spelling, i)
        if len(spelling) > 1:
            return ("after", b)
        return ("digit", b) if spelling.isdigit() else ("letter", b)

    def step(self, states: frozenset, c: str) -> frozenset:
        return self.closure([m for state in states for m in self.moves(state, c)])

    def next_chars(self, states: frozenset) -> set[str]:
        chars = set()
        for state in states:
            kind = state[0]
            if kind == "start" or kind == "punct":
                chars.add(" ")
            elif kind == "before":
                chars.update(self._first_chars(state[1]))
            elif kind in _JOINED:
                firsts = self._one_character_firsts(state[1])
                chars.update(c for c in firsts if c in _JOINED[kind])
                if firsts:
                    chars.add("-")
            elif kind == "hyphen":
                chars.update(self._one_character_firsts(state[1]))
            elif kind == "in":
                chars.add(state[2][state[3]])
            elif kind == "after":
                if state[1] in self.words_from:
                    chars.update(" " + _SEPARATOR_PUNCTUATION)
                if state[1] == self.accept:
                    chars.update(_FINAL_PUNCTUATION)
        return chars

    def accepting(self, states: frozenset) -> bool:
        return ("after", self.accept) in states or ("end",) in states


class TokenSpellings:
    """A vocabulary's text tokens that are printable ASCII, sorted by spelling (GPT-2's Ġ as a space), so that
    the tokens beginning with a prefix are one run of the list, found by bisection; `ids[i]` is the token
    spelled `spellings[i]`.

    Memory is what shapes it. A trie of dicts, one per prefix, held 30 MB for Whisper's 50k tokens; a
    sorted list of their strings 7 MB, and the strings made to sort them stayed resident in the
    interpreter's small-object arenas after they were freed. So the spellings are packed into one string
    and sorted as a byte matrix in numpy (a few MB for a moment, then handed back), with no Python object
    per token: under 1 MB is kept."""

    def __init__(self, tokens: list[str], eot: int):
        ids = np.flatnonzero([_ASCII_TOKEN.fullmatch(text) is not None for text in tokens[:eot]])
        packed = "".join([tokens[i] for i in ids]).replace("Ġ", " ").encode("ascii")
        lengths = np.fromiter((len(tokens[i]) for i in ids), dtype=np.int64, count=len(ids))
        starts = np.cumsum(lengths) - lengths
        # one row per token, zero-padded: as fixed-width bytes, rows sort as their text does ("ab" < "abc")
        rows = np.zeros((len(ids), int(lengths.max(initial=1))), np.uint8)
        row_starts = np.arange(len(ids)) * rows.shape[1] - starts
        rows.reshape(-1)[np.arange(len(packed)) + np.repeat(row_starts, lengths)] = np.frombuffer(packed, np.uint8)
        order = np.argsort(rows.view(f"S{rows.shape[1]}")[:, 0], kind="stable")  # stable: lower ids first
        rows, lengths = rows[order], lengths[order]
        text = rows[np.arange(rows.shape[1]) < lengths[:, None]].tobytes().decode("ascii")
        self.spellings = PackedStrings(text, np.cumsum(lengths))
        self.ids = ids[order].astype(np.int32)

    def run(self, prefix: str, lo: int, hi: int) -> tuple[int, int]:
        """The run of spellings within [lo, hi) that begin with `prefix`."""
        lo = bisect.bisect_left(self.spellings, prefix, lo, hi)
        return lo, bisect.bisect_left(self.spellings, prefix + _AFTER_ASCII, lo, hi)


class PackedStrings(Sequence):
    """Strings held as one string and the offsets where each ends; an item (or a slice's items) is made when
    read, and a bisection reads about 16."""

    def __init__(self, text: str, ends: np.ndarray):
        self._text = text
        self._ends = array.array("q", ends.astype(np.int64).tobytes())  # indexes as ints, not numpy scalars

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return self._text[self._ends[i - 1] if i else 0 : self._ends[i]]


_AFTER_ASCII = "\x7f"  # sorts after every printable ASCII character
_SPELLINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_spellings(tokenizer) -> TokenSpellings:
    """A tokenizer's sorted spellings, made once per tokenizer (every grammar of a bundle shares them)."""
    if tokenizer not in _SPELLINGS:
        _SPELLINGS[tokenizer] = TokenSpellings(tokenizer.tokens, tokenizer.eot)
    return _SPELLINGS[tokenizer]


class TokenGrammar:
    """The tokens allowed after any text a grammar's phrases begin with, over one tokenizer.

    States are ints; `allowed(state)` gives the token ids (with end-of-text where a phrase may end) and
    the state after each."""

    def __init__(self, grammar: Grammar, tokenizer):
        self.grammar = grammar
        self.eot = tokenizer.eot
        self.vocabulary = token_spellings(tokenizer)
        self.forms = SpokenForms(grammar)
        self._ids: dict[frozenset, int] = {}
        self._sets: list[frozenset] = []
        self._steps: dict[tuple[int, str], int | None] = {}
        self._chars: dict[int, set[str]] = {}
        self._allowed: dict[int, tuple[np.ndarray, dict[int, int]]] = {}
        self.start = self._state(self.forms.start)

    def _state(self, states: frozenset) -> int:
        if states not in self._ids:
            self._ids[states] = len(self._sets)
            self._sets.append(states)
        return self._ids[states]

    def _step(self, state: int, c: str) -> int | None:
        key = (state, c)
        if key not in self._steps:
            moved = self.forms.step(self._sets[state], c)
            self._steps[key] = self._state(moved) if moved else None
        return self._steps[key]

    def accepts(self, state: int) -> bool:
        return self.forms.accepting(self._sets[state])

    def _next_chars(self, state: int) -> set[str]:
        if state not in self._chars:
            self._chars[state] = self.forms.next_chars(self._sets[state])
        return self._chars[state]

    def allowed(self, state: int) -> tuple[np.ndarray, dict[int, int]]:
        """(ids of the tokens that may come next, sorted; {token: state after it})."""
        if state not in self._allowed:
            following: dict[int, int] = {}
            spellings, ids = self.vocabulary.spellings, self.vocabulary.ids
            todo = [("", 0, len(spellings), state)]
            while todo:  # the spellings and the automaton side by side: a branch ends where either does
                prefix, lo, hi, at = todo.pop()
                chars, n = self._next_chars(at), len(prefix)
                if hi - lo < len(chars):  # fewer tokens here than characters allowed: try only theirs
                    chars = {text[n] for text in spellings[lo:hi] if len(text) > n} & chars
                for c in chars:
                    after = self._step(at, c)
                    if after is None:
                        continue
                    longer = prefix + c
                    start, stop = self.vocabulary.run(longer, lo, hi)
                    if start == stop:
                        continue
                    exact = start
                    while exact < stop and spellings[exact] == longer:  # tokens spelled just so (first in the run)
                        following[int(ids[exact])] = after
                        exact += 1
                    todo.append((longer, start, stop, after))
            tokens = sorted(following) + ([self.eot] if self.accepts(state) else [])
            self._allowed[state] = (np.asarray(tokens, dtype=np.int64), following)
        return self._allowed[state]

    def state_after(self, tokens: list[int]) -> int | None:
        """The state after `tokens` from the start, or None if they leave the grammar."""
        state = self.start
        for token in tokens:
            state = self.allowed(state)[1].get(token)
            if state is None:
                return None
        return state

    def allowed_after(self, tokens: list[int]) -> np.ndarray:
        """The token ids that may follow `tokens` (none if they already left the grammar)."""
        state = self.state_after(tokens)
        return np.zeros(0, dtype=np.int64) if state is None else self.allowed(state)[0]
