"""Command mode: grammars, their token automata, constrained decoding and rejection."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_asr.grammar import UNKNOWN, Grammar, GrammarError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "grammars"
SMALL = """
# start or stop a line, with or without its number; or yes
root  ::= ("start" | "stop") "line" digit? | "yes"
digit ::= [1-3]
"""
SMALL_WORDS = ["start", "stop", "line", "1", "2", "3", "yes"]
SMALL_PHRASES = {"yes", "start line", "stop line"} | {f"{a} line {d}" for a in ("start", "stop") for d in "123"}


def brute_force(max_words: int = 4):
    """Every sequence of the small grammar's words up to `max_words` long, and whether it is a phrase."""
    for n in range(1, max_words + 1):
        for words in itertools.product(SMALL_WORDS, repeat=n):
            yield " ".join(words), " ".join(words) in SMALL_PHRASES


@pytest.fixture(scope="module")
def tokenizer(bundle_int8):
    from edge_asr.bundle import Bundle

    return Bundle.load(bundle_int8).tokenizer


def test_word_automaton_accepts_exactly_the_grammars_phrases():
    grammar = Grammar.from_text(SMALL)
    assert set(grammar.phrases()) == SMALL_PHRASES
    for text, is_phrase in brute_force():
        assert (grammar.phrase_of(text) is not None) == is_phrase, text
    assert grammar.phrase_of("Stop, line 3.") == ("stop line 3", "root")
    assert grammar.phrase_of("start line three") == ("start line 3", "root")  # a digit's word


def test_token_automaton_accepts_exactly_the_grammars_phrases_in_whispers_spellings(tokenizer):
    from edge_asr.constraint import TokenGrammar

    automaton = TokenGrammar(Grammar.from_text(SMALL), tokenizer)

    def accepted(text: str) -> bool:
        state = automaton.state_after(tokenizer.encode(text))
        return state is not None and automaton.accepts(state)

    for text, is_phrase in brute_force():
        assert accepted(" " + text) == is_phrase, text
        assert accepted(text.capitalize() + ".") == is_phrase, text
    for spelling in (" Start line three.", " STOP LINE 2!", "Start, line 1", " stop line two", " Yes?"):
        assert accepted(spelling), spelling
    for outside in (" start line four", " start", " yes yes", " start line 12", " the line", " sTaRt line 1"):
        assert not accepted(outside), outside


def test_a_spelled_code_may_be_written_as_whisper_writes_codes(tokenizer):
    """One-character words may be joined by hyphens or written back to back where a digit is beside them;
    lower-case letters never run together into a word."""
    from edge_asr.constraint import TokenGrammar

    grammar = Grammar.from_file(EXAMPLES / "codes.gbnf")
    automaton = TokenGrammar(grammar, tokenizer)

    def accepted(text: str) -> bool:
        state = automaton.state_after(tokenizer.encode(text))
        return state is not None and automaton.accepts(state)

    for spelling, phrase in [
        (" K-2-D-E-G.", "k 2 d e g"),
        (" B73X", "b 7 3 x"),
        (" F4-3", "f 4 3"),
        (" 3, 0, x, j.", "3 0 x j"),
        (" b 7 3 x", "b 7 3 x"),
    ]:
        assert accepted(spelling), spelling
        assert grammar.phrase_of(spelling) == (phrase, "root"), spelling
    for outside in (" and", " AND", " K-", " K--2", " -K-2", " K 2-", " b7 3 x 9 9 9 9 9"):
        assert not accepted(outside), outside


def test_masking_never_allows_a_token_outside_the_grammar(tokenizer):
    """Random walks through the allowed tokens always end in a phrase, and every token they pass was allowed."""
    from edge_asr.constraint import TokenGrammar

    for path in ("digits.gbnf", "machine.gbnf", "codes.gbnf", "yes_no.txt"):
        grammar = Grammar.from_file(EXAMPLES / path)
        automaton = TokenGrammar(grammar, tokenizer)
        rng = np.random.default_rng(0)
        for _ in range(60):
            tokens: list[int] = []
            while True:
                allowed = automaton.allowed_after(tokens)
                assert len(allowed) and automaton.state_after(tokens) is not None
                token = int(rng.choice(allowed))
                if token == tokenizer.eot:
                    break
                tokens.append(token)
            assert grammar.phrase_of(tokenizer.decode(tokens)) is not None, (path, tokenizer.decode(tokens))


class RandomLogits:
    """A decoder whose logits are random: what the grammar lets through is all that can come out."""

    backend, max_tokens = "test", 448

    def __init__(self, n_vocab: int, seed: int):
        self.n_vocab, self.rng = n_vocab, np.random.default_rng(seed)

    def encode(self, mel):
        return []

    def empty_cache(self):
        return [np.zeros((1, 0))]

    def decode(self, tokens, cache, cross):
        return self.rng.normal(0, 3, self.n_vocab).astype(np.float32), cache

    def select_beams(self, cache, sources):
        return [np.zeros((len(sources), 0))]

    def decode_batch(self, tokens, cache, cross):
        return self.rng.normal(0, 3, (len(tokens), self.n_vocab)).astype(np.float32), [np.zeros((len(tokens), 0))]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_constrained_decoding_writes_only_phrases_and_measures_what_the_grammar_cost(bundle_int8, tokenizer, beam_size):
    from edge_asr.bundle import Bundle
    from edge_asr.constraint import TokenGrammar
    from edge_asr.decoding import DecodingOptions, WindowDecoder

    bundle = Bundle.load(bundle_int8)
    config = dict(bundle.manifest.decoder, n_vocab=bundle.manifest.model.dims["n_vocab"])
    grammar = Grammar.from_file(EXAMPLES / "machine.gbnf")
    options = DecodingOptions(beam_size=beam_size, grammar=TokenGrammar(grammar, tokenizer))
    for seed in range(8):
        model = RandomLogits(config["n_vocab"], seed)
        decoder = WindowDecoder(model, config, options)
        result = decoder.decode(decoder.prefill(cross=[]))
        assert grammar.phrase_of(tokenizer.decode(result.tokens)) is not None
        # random logits never favour the grammar's tokens: it overrules them at every step
        assert result.grammar_gap < -1.0


def test_a_command_is_recognized_and_a_sentence_is_rejected(bundle_int8, tmp_path):
    import edge_asr
    from edge_asr.settings import DecodingSettings
    from edge_asr_build.speech.synth import synthesize

    transcriber = edge_asr.load(bundle_int8, settings=DecodingSettings(grammar=str(EXAMPLES / "machine.gbnf")))
    pad = np.zeros(4000, np.float32)
    command = transcriber.transcribe(np.concatenate([pad, synthesize("Stop line four."), pad])).segments
    assert [(s.text, s.rule) for s in command] == [("stop line four", "line")]
    assert command[0].confidence >= transcriber.command.threshold
    sentence = transcriber.transcribe(np.concatenate([pad, synthesize("The weather was lovely at the seaside."), pad]))
    assert [s.text for s in sentence.segments] == [UNKNOWN]
    assert sentence.segments[0].confidence < transcriber.command.threshold
    assert transcriber.transcribe(np.zeros(32000, np.float32)).segments == []  # silence: nothing, not [unk]


def test_a_word_list_is_named_as_sentences_and_decoded_greedily(tokenizer):
    from edge_asr.commands import CommandMode, is_word_list

    lists = {"digits.gbnf": True, "yes_no.txt": True, "machine.gbnf": False, "codes.gbnf": False}
    assert {name: is_word_list(Grammar.from_file(EXAMPLES / name)) for name in lists} == lists
    digits = CommandMode(Grammar.from_file(EXAMPLES / "digits.gbnf"), tokenizer)
    assert digits.greedy and tokenizer.decode(list(digits.prompt)).startswith(" Zero. Oh. One. Two.")
    menu = CommandMode(Grammar.from_file(EXAMPLES / "machine.gbnf"), tokenizer)
    assert not menu.greedy and tokenizer.decode(list(menu.prompt)).startswith(" start stop line one two")


def test_command_mode_takes_beams_only_for_a_grammar_of_phrases(bundle_int8):
    from edge_asr.transcriber import ShortWindowBeam, Transcriber

    for name, beams in (("digits.gbnf", False), ("machine.gbnf", True)):
        transcriber = Transcriber(bundle_int8, grammar=EXAMPLES / name, short_window_beam=ShortWindowBeam(5.0, 5))
        assert (transcriber.decoder_for(16000).options.beam_size > 1) is beams, name
        assert transcriber.decoder_for(8 * 16000).options.beam_size == 1


@pytest.mark.parametrize(
    "text, where",
    [
        ('root ::= "start" (\n', "2:1"),
        ('root ::= "yes" | start\n', "1:18"),
        ('\nroot ::= "a" {3,1}\n', "2:14"),
        ('root ::= "a" ; "b"\n', "1:14"),
        ("digit ::= [0-9]\n", None),
        ('root ::= ((("a" | "b"){64}){64}){64}\n', None),
    ],
)
def test_an_invalid_grammar_names_its_line_and_column(tmp_path, text, where):
    path = tmp_path / "bad.gbnf"
    path.write_text(text)
    with pytest.raises(GrammarError) as error:
        Grammar.from_file(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path))
    if where:
        assert f"{path}:{where}:" in message, message


def test_cli_invalid_grammar_is_one_line_and_exit_2(tmp_path, bundle_int8):
    from edge_asr_build.speech.synth import synthesize, write_wav

    bad = tmp_path / "bad.gbnf"
    bad.write_text('root ::= "start" | \n')
    wav = tmp_path / "a.wav"
    write_wav(wav, synthesize("Stop."))
    for grammar in (bad, tmp_path / "missing.gbnf"):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_asr",
                "transcribe",
                "--bundle",
                str(bundle_int8),
                "--grammar",
                str(grammar),
                str(wav),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and str(grammar) in run.stderr, run.stderr


def test_daemon_switches_grammars_at_run_time(tmp_path, bundle_int8):
    """A menu: [decoding] grammar names the first screen's grammar, POST /grammar the next; the JSONL lines
    carry phrase, rule and confidence, and GET /status the active grammar."""
    import json
    import urllib.error
    import urllib.request

    from edge_asr.service.daemon import Daemon, load_config
    from edge_asr_build.speech.synth import synthesize, write_wav

    pause = np.zeros(24000, np.float32)
    wav = tmp_path / "menu.wav"
    write_wav(wav, np.concatenate([pause, synthesize("Stop line four."), pause, synthesize("Yes."), pause]))
    config = tmp_path / "c.toml"
    config.write_text(
        f'[input]\nsource = "{wav}"\nrealtime = false\n[model]\nbundle = "{bundle_int8}"\n'
        f'[decoding]\ngrammar = "menu"\n[grammars]\nmenu = "{EXAMPLES / "machine.gbnf"}"\n'
        f'confirm = "{EXAMPLES / "yes_no.txt"}"\n'
        f'[output]\njsonl = "{tmp_path / "o.jsonl"}"\n[status]\nlisten = "127.0.0.1:0"\n'
    )
    daemon = Daemon(load_config(config))
    daemon.source = daemon._make_source()
    server = daemon._serve_status()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def post(name):
        request = urllib.request.Request(f"{url}/grammar", data=json.dumps({"name": name}).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        switched = False
        for block in daemon.source:
            daemon.feed(block)
            if daemon.recognizer.counters.utterances == 1 and not switched:
                assert post("no-such-menu") == 404
                assert post("confirm") == 200
                switched = True
        daemon.recognizer.finish()
        with urllib.request.urlopen(f"{url}/status", timeout=10) as r:
            status = json.loads(r.read())
    finally:
        server.shutdown()
        for sink in daemon.sinks:
            sink.close()
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [(r["text"], r["rule"]) for r in records] == [("stop line four", "line"), ("yes", "yes")]
    assert all(0 < r["confidence"] <= 1 for r in records)
    assert status["grammar"] == "confirm"
