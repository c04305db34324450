"""Command grammars: which phrases a user may say, as a word-level automaton.

Two file formats:

- a **phrase list**: one phrase per line, `#` starts a comment. Each phrase is its own rule;
- a **GBNF grammar**, the subset of llama.cpp's and whisper.cpp's format that describes phrases:
  `name ::= expression` rules (`root` is where a phrase starts; a rule may continue on the next lines),
  string literals `"start line"`, character classes `[0-9]` and `[a-z]` (one character each), rule
  references, grouping `( … )`, alternatives `|`, and repetition `?`, `*`, `+`, `{m}`, `{m,}`, `{m,n}`.

A file is a GBNF grammar when one of its lines defines a rule (`::=`), a phrase list otherwise.

Grammars here are over **words**, not characters: a literal is split into its words, and spacing, case and
punctuation between words are left to the decoder (so whisper.cpp grammars whose literals carry their own
`" "` read the same). A word may be written as Whisper writes it in any of its spellings: a digit word as
its digit ("seven" and "7"), and single digits back to back without spaces, or a digit and a single
letter ("4 5 2" as "452", "B 7 3 X" as "B73X"; letters alone are not run together, or "and" would be a
spelled a-n-d).

The automaton is Thompson's construction: states joined by word edges and empty edges. `phrase_of` runs a
decoded text back through it to the grammar's own words and the rule of `root` the phrase came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import InputError
from .limits import check_word, read_text_file

UNKNOWN = "[unk]"
DIGIT_WORDS = {
    "zero": "0",
    "oh": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
}
MAX_REPEAT = 64  # {m,n} copies the automaton of its item n times: bounded so a typo cannot explode it
MAX_STATES = 200_000  # nested repetitions multiply: (((x){64}){64}){64} is refused, not built
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class GrammarError(InputError):
    pass


def word_spellings(word: str) -> set[str]:
    """The ways Whisper may write a grammar word, lower-cased: itself, and a digit word's digit or a
    digit's words ("seven" <-> "7", "0" -> "zero" and "oh")."""
    forms = {word}
    if word in DIGIT_WORDS:
        forms.add(DIGIT_WORDS[word])
    forms.update(w for w, d in DIGIT_WORDS.items() if d == word)
    return forms


def reachable(edges: dict[int, list[int]], starts) -> set[int]:
    """`starts` and every state reachable from them along `edges` ({state: following states})."""
    seen, todo = set(starts), list(starts)
    while todo:
        for b in edges.get(todo.pop(), ()):
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def text_words(text: str) -> list[str]:
    """`text`'s words, lower-cased, without punctuation ("Line 452." -> line 452)."""
    return _WORD.findall(text.lower())


# --- the word automaton ---------------------------------------------------------------------------------------


@dataclass
class WordAutomaton:
    """States 0..n-1; `start`, `accept`; word edges (state, word, state) and empty edges (state, state).
    An empty edge out of `start` may carry the rule name a phrase is reported under (`labels`)."""

    n: int = 0
    start: int = 0
    accept: int = 0
    words: list[tuple[int, str, int]] = field(default_factory=list)
    empty: list[tuple[int, int]] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)  # first state of a labelled alternative -> its rule
    source: str = "<grammar>"  # the file it came from, for errors

    def new_state(self) -> int:
        if self.n >= MAX_STATES:
            raise GrammarError(
                f"{self.source}: the grammar expands to more than {MAX_STATES:,} states: nest fewer repetitions"
            )
        self.n += 1
        return self.n - 1

    # Adjacency, read once the automaton is built (compiling only adds edges; reading only follows them).
    @cached_property
    def empty_from(self) -> dict[int, list[int]]:
        """{state: the states its empty edges lead to}."""
        following: dict[int, list[int]] = {}
        for a, b in self.empty:
            following.setdefault(a, []).append(b)
        return following

    @cached_property
    def words_from(self) -> dict[int, list[tuple[str, int]]]:
        """{state: its word edges as (word, state after it)}."""
        following: dict[int, list[tuple[str, int]]] = {}
        for a, word, b in self.words:
            following.setdefault(a, []).append((word, b))
        return following

    def closure(self, states) -> set[int]:
        """`states` and every state their empty edges reach."""
        return reachable(self.empty_from, states)

    def ending(self) -> set[int]:
        """The states whose empty edges reach the accepting state: where a phrase may end."""
        back: dict[int, list[int]] = {}
        for a, b in self.empty:
            back.setdefault(b, []).append(a)
        return reachable(back, [self.accept])

    def reaching_accept(self) -> set[int]:
        """The states from which the accepting state can be reached, over edges of either kind."""
        back: dict[int, list[int]] = {}
        for a, b in self.empty:
            back.setdefault(b, []).append(a)
        for a, _, b in self.words:
            back.setdefault(b, []).append(a)
        return reachable(back, [self.accept])

    def phrases(self, limit: int = 10_000, max_words: int = 16) -> list[str]:
        """The phrases the automaton accepts, shortest first, up to `limit` of them and `max_words` long."""
        found: dict[str, None] = {}
        layer = {(s, ()) for s in self.closure([self.start])}
        for _ in range(max_words + 1):
            found.update((" ".join(words), None) for s, words in sorted(layer) if s == self.accept)
            if len(found) >= limit or not layer:
                break
            layer = {
                (t, words + (word,))
                for s, words in layer
                for word, b in self.words_from.get(s, ())
                for t in self.closure([b])
            }
        return list(found)[:limit]

    def phrase_of(self, text: str) -> tuple[str, str] | None:
        """(phrase in the grammar's own words, rule) that `text` says, or None when it says none."""

        def close(paths: dict[int, tuple]) -> dict[int, tuple]:
            """`paths` ({state: (grammar words said, rule)}) and where their empty edges lead, the rule
            taken from the first labelled state on the way."""
            todo = list(paths)
            while todo:
                state = todo.pop()
                words, rule = paths[state]
                for b in self.empty_from.get(state, ()):
                    if b not in paths:
                        paths[b] = (words, self.labels.get(b, rule))
                        todo.append(b)
            return paths

        def advance(paths: dict[int, tuple], spoken: str) -> dict[int, tuple]:
            moved: dict[int, tuple] = {}
            for state, (said, rule) in paths.items():
                for word, b in self.words_from.get(state, ()):
                    if spoken in word_spellings(word):
                        moved.setdefault(b, (said + (word,), rule))
            return close(moved)

        paths = close({self.start: ((), "root")})
        for spoken in text_words(text):
            moved = advance(paths, spoken)
            if not moved and len(spoken) > 1:  # one-character words written together ("b73")
                moved = paths
                for char in spoken:
                    moved = advance(moved, char)
            paths = moved
        if self.accept not in paths:
            return None
        words, rule = paths[self.accept]
        return " ".join(words), rule


# --- parsing --------------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r]+) | (?P<newline>\n) | (?P<comment>\#[^\n]*)
  | (?P<define>::=) | (?P<name>[A-Za-z][A-Za-z0-9_-]*)
  | (?P<literal>"(?:[^"\\\n]|\\.)*") | (?P<chars>\[(?:[^\]\\\n]|\\.)*\])
  | (?P<repeat>\{\s*\d+\s*(?:,\s*\d*\s*)?\}) | (?P<op>[|()?*+])
""",
    re.VERBOSE,
)


@dataclass
class _Token:
    kind: str
    text: str
    line: int
    column: int


def _tokens(text: str, source: str) -> list[_Token]:
    tokens, line, line_start, pos = [], 1, 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise GrammarError(f"{source}:{line}:{pos - line_start + 1}: unexpected {text[pos]!r}")
        if m.lastgroup == "newline":
            line, line_start = line + 1, m.end()
        elif m.lastgroup not in ("space", "comment"):
            tokens.append(_Token(m.lastgroup, m.group(), line, pos - line_start + 1))
        pos = m.end()
    return tokens


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def _class_chars(token: _Token, source: str) -> list[str]:
    body = _unescape(token.text[1:-1])
    if body.startswith("^"):
        raise GrammarError(f"{source}:{token.line}:{token.column}: negated character classes are not phrases")
    chars, i = [], 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            chars += [chr(c) for c in range(ord(body[i]), ord(body[i + 2]) + 1)]
            i += 3
        else:
            chars.append(body[i])
            i += 1
    return list(dict.fromkeys(c.lower() for c in chars if c.isalnum()))


class _Parser:
    """Recursive descent over one GBNF file into expression trees:
    ("seq", items) | ("alt", items) | ("word", w) | ("ref", name, token) | ("repeat", item, lo, hi)."""

    def __init__(self, text: str, source: str):
        self.tokens, self.pos, self.source = _tokens(text, source), 0, source
        lines = text.split("\n")
        self.end = _Token("end", "", len(lines), len(lines[-1]) + 1)  # where a rule cut short is reported

    def error(self, message: str, token: _Token | None = None) -> GrammarError:
        token = token or (self.tokens[self.pos] if self.pos < len(self.tokens) else self.end)
        return GrammarError(f"{self.source}:{token.line}:{token.column}: {message}")

    def peek(self, offset: int = 0) -> _Token | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def rules(self) -> dict[str, tuple]:
        rules: dict[str, tuple] = {}
        while self.peek():
            name = self.peek()
            if name.kind != "name" or not self.peek(1) or self.peek(1).kind != "define":
                raise self.error("expected a rule: name ::= …")
            if name.text in rules:
                raise self.error(f"rule {name.text!r} is defined twice", name)
            self.pos += 2
            rules[name.text] = self.alternatives()
        return rules

    def at_rule_start(self) -> bool:
        token, following = self.peek(), self.peek(1)
        return token is not None and token.kind == "name" and following is not None and following.kind == "define"

    def alternatives(self) -> tuple:
        options = [self.sequence()]
        while self.peek() and self.peek().text == "|":
            self.pos += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else ("alt", options)

    def sequence(self) -> tuple:
        items = []
        while self.peek() and not self.at_rule_start() and self.peek().text not in ("|", ")"):
            items.append(self.repetition(self.item()))
        if not items:
            raise self.error("expected a literal, a character class, a rule or a group")
        return items[0] if len(items) == 1 else ("seq", items)

    def item(self) -> tuple:
        token = self.peek()
        self.pos += 1
        if token.kind == "literal":
            words = [check_word(w, self.source) for w in _WORD.findall(_unescape(token.text[1:-1]).lower())]
            return ("seq", [("word", w) for w in words])
        if token.kind == "chars":
            chars = _class_chars(token, self.source)
            if not chars:
                raise self.error("a character class with no letter or digit", token)
            return ("alt", [("word", c) for c in chars])
        if token.kind == "name":
            return ("ref", token.text, token)
        if token.text == "(":
            inner = self.alternatives()
            if not self.peek() or self.peek().text != ")":
                raise self.error("expected ')'")
            self.pos += 1
            return inner
        raise self.error(f"unexpected {token.text!r}", token)

    def repetition(self, item: tuple) -> tuple:
        while self.peek() and (self.peek().kind == "repeat" or self.peek().text in ("?", "*", "+")):
            token = self.peek()
            self.pos += 1
            if token.text in ("?", "*", "+"):
                lo, hi = {"?": (0, 1), "*": (0, None), "+": (1, None)}[token.text]
                if item[0] == "repeat" and item[2] in (0, 1) and item[3] in (1, None):
                    # x?+, x+*, x++ …: one operator (at least once if both say so, at most once if both
                    # do), not a copy of the automaton per operator: "[a-z]?+++++++++++" had 116,737 states
                    item, lo, hi = item[1], item[2] * lo, (1 if item[3] == hi == 1 else None)
            else:
                # split() drops every kind of space (\s matched "\x1e" in a fuzzed grammar); a bound of more than
                # four digits is past MAX_REPEAT whatever it says, and int() refuses 4,300 digits
                bounds = "".join(token.text[1:-1].split()).split(",")
                too_long = any(len(b) > 4 for b in bounds)
                lo = 0 if too_long else int(bounds[0])
                hi = lo if len(bounds) == 1 else (int(bounds[1]) if bounds[1] and not too_long else None)
                if too_long or (hi is not None and hi < lo) or max(lo, hi or 0) > MAX_REPEAT:
                    shown = token.text if len(token.text) <= 16 else token.text[:12] + "…}"
                    raise self.error(f"repetition {shown} must have m <= n <= {MAX_REPEAT}", token)
            item = ("repeat", item, lo, hi)
        return item


@dataclass
class Grammar:
    """A grammar and its word automaton. `text` is what it was read from: the key of compiled caches."""

    name: str
    text: str
    automaton: WordAutomaton

    @classmethod
    def from_file(cls, path: str | Path) -> Grammar:
        path = Path(path)
        return cls.from_text(read_text_file(path, "grammar"), path.stem, str(path))

    @classmethod
    def from_text(cls, text: str, name: str = "grammar", source: str = "<grammar>") -> Grammar:
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        if any("::=" in line for line in lines):
            return cls(name, text, _compile_rules(_Parser(text, source).rules(), source))
        return cls(name, text, phrase_list([line for line in lines if line.strip()], source))

    def phrase_of(self, text: str) -> tuple[str, str] | None:
        return self.automaton.phrase_of(text)

    def phrases(self, limit: int = 10_000, max_words: int = 16) -> list[str]:
        return self.automaton.phrases(limit, max_words)


def phrase_list(phrases: list[str], source: str = "<phrases>") -> WordAutomaton:
    """The automaton of a list of phrases, each reported as its own rule."""
    rules = {"root": ("alt", [("ref", f"phrase{i}", None) for i in range(len(phrases))])}
    names = {}
    for i, phrase in enumerate(phrases):
        words = [check_word(w, source) for w in text_words(phrase)]
        if not words:
            raise GrammarError(f"{source}: phrase {phrase.strip()!r} has no words")
        rules[f"phrase{i}"] = ("seq", [("word", w) for w in words])
        names[f"phrase{i}"] = " ".join(words)
    return _compile_rules(rules, source, names)


def _compile_rules(rules: dict[str, tuple], source: str, names: dict[str, str] | None = None) -> WordAutomaton:
    if "root" not in rules:
        raise GrammarError(f"{source}: no root rule (root ::= …): where a phrase starts")
    names = names or {}
    automaton = WordAutomaton(source=source)

    def build(node: tuple, active: tuple[str, ...]) -> tuple[int, int]:
        kind = node[0]
        if kind == "word":
            a, b = automaton.new_state(), automaton.new_state()
            automaton.words.append((a, node[1], b))
            return a, b
        if kind == "seq":
            a = b = automaton.new_state()
            for item in node[1]:
                s, e = build(item, active)
                automaton.empty.append((b, s))
                b = e
            return a, b
        if kind == "alt":
            a, b = automaton.new_state(), automaton.new_state()
            for item in node[1]:
                s, e = build(item, active)
                automaton.empty += [(a, s), (e, b)]
            return a, b
        if kind == "ref":
            name, token = node[1], node[2]
            where = f"{source}:{token.line}:{token.column}" if token else source
            if name not in rules:
                raise GrammarError(f"{where}: rule {name!r} is not defined")
            if name in active:
                raise GrammarError(f"{where}: rule {name!r} refers to itself; use repetition (* + {{m,n}}) instead")
            return build(rules[name], active + (name,))
        _, item, lo, hi = node  # repeat
        a = b = automaton.new_state()
        for _ in range(lo):
            s, e = build(item, active)
            automaton.empty.append((b, s))
            b = e
        if hi is None:  # a loop: the item again and again, or not at all
            s, e = build(item, active)
            automaton.empty += [(b, s), (e, b)]
            return a, b
        end = automaton.new_state()
        automaton.empty.append((b, end))
        for _ in range(hi - lo):
            s, e = build(item, active)
            automaton.empty += [(b, s), (e, end)]
            b = e
        return a, end

    root = rules["root"]
    automaton.start, automaton.accept = automaton.new_state(), automaton.new_state()
    # Each alternative of root is reported as the rule it names, when it names one alone.
    for option in root[1] if root[0] == "alt" else [root]:
        s, e = build(option, ("root",))
        automaton.empty += [(automaton.start, s), (e, automaton.accept)]
        if option[0] == "ref":
            automaton.labels[s] = names.get(option[1], option[1])
    return automaton
