"""Detokenization from the bundle's token list equals the Hugging Face tokenizer's decoding."""

import random

from edge_asr.tokenizer import Tokenizer
from edge_asr_build.whisper.vocabulary import special_tokens, token_strings


def test_decode_matches_tokenizers_library(tiny):
    from tokenizers import Tokenizer as HfTokenizer

    tokens = token_strings(tiny.tokenizer_json, tiny.model.dims.n_vocab)
    ours = Tokenizer(tokens, special_tokens(tokens))
    theirs = HfTokenizer.from_file(str(tiny.tokenizer_json))
    for text in ["Replace the filter on pump 7, then log it.", "naïve café — 42 °C", "  spaces  and\ttabs"]:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == theirs.decode(ids)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(ours.eot) for _ in range(12)]
        assert ours.decode(ids) == theirs.decode(ids)


def test_special_tokens_and_timestamps(tiny):
    tokens = token_strings(tiny.tokenizer_json, tiny.model.dims.n_vocab)
    special = special_tokens(tokens)
    assert tokens[special["timestamp_begin"]] == "<|0.00|>"
    assert tokens[-1] == "<|30.00|>"
    assert special["eot"] == 50256 and special["sot"] == 50257 and special["no_timestamps"] == 50362
    assert Tokenizer(tokens, special).decode([special["sot"], 464, special["eot"]]) == "The"


def test_encoding_matches_tokenizers_library_and_the_lookup_survives_hash_collisions(tiny):
    from tokenizers import Tokenizer as HfTokenizer

    from edge_asr.tokenizer import TokenIds

    tokens = token_strings(tiny.tokenizer_json, tiny.model.dims.n_vocab)
    ours = Tokenizer(tokens, special_tokens(tokens))
    theirs = HfTokenizer.from_file(str(tiny.tokenizer_json))
    for text in [" Replace the hydraulic filter on press 4.", " naïve café — 42 °C", " Kestrolix supervisor"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids

    class Colliding(str):  # every string hashes alike: only the comparison of strings can tell them apart
        def __hash__(self):
            return 7

    words = [Colliding(w) for w in ("pump", "valve", "press", "line")]
    ids = TokenIds(words, len(words))
    assert [ids.get(Colliding(w)) for w in ("line", "pump", "press", "valve", "belt")] == [3, 0, 2, 1, None]


def test_token_spellings_sort_as_text_and_find_every_prefix_run():
    from edge_asr.constraint import TokenSpellings

    tokens = ["ab", "Ġab", "a", "Ġa", "abc", "b", "é", "Ġ", "ab", "<|endoftext|>", "zz"]
    spellings = TokenSpellings(tokens, eot=9)  # "zz" lies past end-of-text
    expected = sorted((t.replace("Ġ", " "), i) for i, t in enumerate(tokens[:9]) if t != "é")
    assert list(spellings.spellings) == [text for text, _ in expected]
    assert spellings.ids.tolist() == [i for _, i in expected]  # equal spellings ("ab" twice): the lower id first
    for prefix in ("", "a", "ab", " ", " a", "b", "c"):
        lo, hi = spellings.run(prefix, 0, len(spellings.spellings))
        assert spellings.spellings[lo:hi] == [text for text, _ in expected if text.startswith(prefix)]
    assert len(TokenSpellings(["é", "ü"], eot=2).spellings) == 0  # no ASCII token at all
