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
