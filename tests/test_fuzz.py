"""Property tests of hostile input: each fuzz target (tests/fuzz_targets.py) on mutated valid inputs and on
random bytes, for a few seconds each. The examples are derandomized, so a run is the same on every machine;
benchmarks/fuzz.py explores for minutes, and what it finds becomes a regression test here."""

from __future__ import annotations

import json

import fuzz_targets as targets
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,  # the targets bound their own time (fuzz_targets.TIME_BOUND_S)
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed after a few byte-level edits: flips, cuts, insertions, repeats, boundary values."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "boundary", "word"]))
        if edit == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "word":
            data[at:at] = draw(st.sampled_from(targets.DICTIONARY))
        elif edit == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 32))] * draw(st.integers(1, 64))
        elif at + 4 <= len(data):
            data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f"]))
    return bytes(data)


def inputs(seeds: list[bytes], max_size: int = 2048):
    return st.one_of(mutated(seeds), st.binary(max_size=max_size))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def json_mutated(draw, seed: bytes) -> bytes:
    """The seed's JSON with a few values replaced by any JSON value, or removed: wrong types, missing keys."""
    data = json.loads(seed)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = data
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            continue
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(JSON_VALUES)
    return json.dumps(data).encode()


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    return targets.make_bundle(tmp_path_factory.mktemp("fuzz") / "bundle")


@fuzz(150)
@given(data=inputs(targets.audio_seeds()))
def test_audio_files_give_samples_in_range_or_one_error(data):
    targets.audio_file(data)


def test_bundle_loader_refuses_malformed_manifests_and_opens_nothing_outside(small_bundle):
    seed = targets.manifest_seeds(small_bundle)[0]

    @fuzz(300)
    @given(data=st.one_of(json_mutated(seed), json_mutated(seed), mutated([seed])))
    def run(data):
        targets.manifest_file(data, small_bundle)

    run()


def test_bundle_loader_reads_any_graph_without_leaving_its_folder(small_bundle):
    @fuzz(150)
    @given(data=inputs(targets.graph_seeds(small_bundle)))
    def run(data):
        targets.graph_file(data, small_bundle)

    run()


def test_daemon_configuration_is_settings_or_one_error(tmp_path):
    @fuzz(300)
    @given(data=inputs(targets.config_seeds()))
    def run(data):
        targets.config_file(data, tmp_path)

    run()


def test_hotwords_prompts_and_grammars_are_bounded_and_refused_on_one_line(tokenizer):
    @fuzz(60)
    @given(data=inputs(targets.text_seeds()))
    def run(data):
        targets.user_text(data, tokenizer)

    run()


def test_the_spool_reader_returns_whole_lines_once_in_order(tmp_path):
    @fuzz(200)
    @given(data=inputs(targets.spool_seeds(), 4096))
    def run(data):
        targets.spool_log(data, tmp_path)

    run()


def test_the_status_endpoint_answers_malformed_http_and_keeps_serving():
    server = targets.StatusServer.start()
    try:

        @fuzz(100)
        @given(data=inputs(targets.http_seeds(), 512))
        def run(data):
            targets.status_request(data, server)

        run()
    finally:
        server.stop()


def test_no_text_from_signals_without_speech(bundle_auto):
    """Every kind of noise_signals.from_bytes: noise, hum, tones, square waves, clicks, constants, and the fuzz
    bytes repeated as samples (a periodic buzz of any shape)."""
    import edge_asr

    recognizer = edge_asr.load(bundle_auto)

    @fuzz(24)
    @given(kind=st.integers(0, 8), data=st.binary(max_size=40))
    def run(kind, data):
        targets.no_speech(bytes([kind]) + data, recognizer)

    run()


@pytest.fixture(scope="module")
def tokenizer(bundle_int8):
    from edge_asr.bundle import Bundle

    return Bundle.load(bundle_int8).tokenizer


# -- what fuzzing found, kept ------------------------------------------------------------------------------------


def test_a_flac_header_claiming_68_billion_samples_is_read_as_what_it_holds():
    """benchmarks/fuzz.py's audio target: libsndfile sized the read by the header, 256 GiB at once."""
    import io

    from edge_asr.audio import decode_audio
    from edge_asr.errors import AudioError

    flac = bytearray(targets.audio_seeds()[3])
    flac[21] |= 0x0F  # STREAMINFO's 36-bit total sample count, all ones
    flac[22:26] = b"\xff" * 4
    with pytest.raises(AudioError, match="not a readable audio file"):
        decode_audio(io.BytesIO(bytes(flac)), "lying.flac")
    targets.audio_file(bytes(flac))


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "part number" [0-9]{3\x1e\x1e}\n',  # \s matched the record separator; int() did not
        'root ::= "a"{' + "9" * 5000 + "}\n",  # int() refuses 4,300 digits
    ],
)
def test_a_grammar_repetition_with_odd_spaces_or_endless_digits_parses_or_is_one_error(grammar):
    from edge_asr.grammar import Grammar, GrammarError

    try:
        Grammar.from_text(grammar)
    except GrammarError as e:
        assert len(str(e)) < 200 and "\n" not in str(e)


def test_corrupt_sds_and_mp3_files_print_nothing_on_the_console():
    """benchmarks/fuzz.py's audio target: libsndfile's SDS reader printf()s "Error A : 00" to stdout and
    mpg123 its resync notes to stderr; and seeking stdin's bytes before their start raised inside a C callback,
    which Python printed as a traceback."""
    import io

    import soundfile as sf

    tone = (0.3 * np.sin(np.arange(3000) / 5)).astype(np.float32)
    for fmt, step in (("SDS", 7), ("MP3", 13)):
        buffer = io.BytesIO()
        sf.write(buffer, tone, 8000, format=fmt)
        data = bytearray(buffer.getvalue())
        for i in range(40, len(data), step):
            data[i] ^= 0x55
        targets.audio_file(bytes(data))


def test_nested_repetition_operators_are_one_operator_not_a_copy_each():
    """benchmarks/fuzz.py's text target: '[a-z]?+++++++++++' expanded to 116,737 states, and command mode's
    word-list check took a closure per word over them (minutes)."""
    from edge_asr.grammar import Grammar

    nested, plain = (Grammar.from_text(f"root ::= {g}\n") for g in ('"a"?++++++++++ "b"', '"a"* "b"'))
    assert nested.automaton.n < 20 and nested.phrases(limit=50) == plain.phrases(limit=50)
    for ops, phrases in (("?+", {"b", "a b", "a a b"}), ("+?", {"b", "a b", "a a b"}), ("??", {"b", "a b"})):
        grammar = Grammar.from_text(f'root ::= "a"{ops} "b"\n')
        assert set(grammar.phrases(limit=3, max_words=3)) == phrases, ops
