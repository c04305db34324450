"""Tokenizer facts the runtime needs, read from a Hugging Face `tokenizer.json` at build time.

The runtime only detokenizes, so a bundle carries the token strings (byte-level BPE symbols) and the ids
of the special tokens; no tokenizer library is needed on the device.
"""

from __future__ import annotations

import json
from pathlib import Path

# Symbols Whisper never lets the decoder emit by default: openai-whisper's `non_speech_tokens`.
_NON_SPEECH_SYMBOLS = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
_NON_SPEECH_SYMBOLS += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
_MISC_SYMBOLS = set("♩♪♫♬♭♮♯")


def token_strings(tokenizer_json: Path, n_vocab: int) -> list[str]:
    """Token string of every id in [0, n_vocab), timestamp tokens included.

    tokenizer.json files of Whisper often stop before the timestamp tokens; those are named here the way
    Whisper names them (<|0.00|> … <|30.00|>, 0.02 s apart), right after <|notimestamps|>.
    """
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    tokens: list[str | None] = [None] * n_vocab
    for text, idx in spec["model"]["vocab"].items():
        if idx < n_vocab:
            tokens[idx] = text
    for added in spec.get("added_tokens", []):
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
    no_timestamps = tokens.index("<|notimestamps|>")
    for idx in range(no_timestamps + 1, n_vocab):
        if tokens[idx] is None:
            tokens[idx] = f"<|{(idx - no_timestamps - 1) * 0.02:.2f}|>"
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"{tokenizer_json}: no token for ids {missing[:5]}… ({len(missing)} missing)")
    return tokens


def special_tokens(tokens: list[str]) -> dict:
    """Ids of Whisper's special tokens, by name; absent ones (English-only models) are left out."""
    names = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "translate": "<|translate|>",
        "transcribe": "<|transcribe|>",
        "sot_lm": "<|startoflm|>",
        "sot_prev": "<|startofprev|>",
        "no_timestamps": "<|notimestamps|>",
        "timestamp_begin": "<|0.00|>",
        "english": "<|en|>",
    }
    index = {t: i for i, t in enumerate(tokens)}
    found = {key: index[text] for key, text in names.items() if text in index}
    for text in ("<|nospeech|>", "<|nocaptions|>"):
        if text in index:
            found["no_speech"] = index[text]
    return found


def non_speech_tokens(tokenizer_json: Path) -> list[int]:
    """Ids of tokens that are only punctuation/markup Whisper should not emit (openai-whisper's rule)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = {tok.encode(" -", add_special_tokens=False).ids[0], tok.encode(" '", add_special_tokens=False).ids[0]}
    for symbol in _NON_SPEECH_SYMBOLS + sorted(_MISC_SYMBOLS):
        for variant in (symbol, " " + symbol):
            encoded = tok.encode(variant, add_special_tokens=False).ids
            if len(encoded) == 1 or symbol in _MISC_SYMBOLS:
                ids.add(encoded[0])
    return sorted(ids)


def decoder_prompt(special: dict, multilingual: bool) -> list[int]:
    """Whisper's start sequence for English transcription without timestamps."""
    if multilingual:
        return [special["sot"], special["english"], special["transcribe"], special["no_timestamps"]]
    return [special["sot"], special["no_timestamps"]]


def decoding_rules(loaded) -> dict:
    """The decoder section a bundle of `loaded` (a `sources.LoadedWhisper`) would carry, with n_vocab: the
    runtime decoder's config, which the build step's own greedy transcripts (reference matching) follow too."""
    return decoder_section(loaded) | {"n_vocab": loaded.model.dims.n_vocab}


def decoder_section(loaded, special: dict | None = None) -> dict:
    """What the runtime's greedy decoder is configured by: prompt, special and suppressed tokens."""
    dims = loaded.model.dims
    special = special or special_tokens(token_strings(loaded.tokenizer_json, dims.n_vocab))
    return {
        "prompt": decoder_prompt(special, dims.is_multilingual),
        "special_tokens": special,
        "suppress_tokens": loaded.suppress_tokens,
        "suppress_blank": loaded.suppress_blank_tokens,
        "mode": "no-timestamps",
    }
