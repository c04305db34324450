"""The bundle manifest, typed: the one schema the build step writes and the runtime reads.

`manifest.json` (format "edge-asr-bundle", schema version `FORMAT_VERSION`):

    format, format_version, name, created, builder
    model       family ("whisper" | "lstm-ctc"), precision, parameters,
                graphs {role: file} (ONNX), graph_data {role: [file]} (tensors kept apart),
                ort / tflite {graphs: {role: file}, …} (the same models in other formats);
                whisper: dims {n_mels, n_vocab, n_text_ctx, …}, multilingual;
                lstm-ctc: config, architecture, state (names of the recurrent state tensors)
    source      where the weights came from: format, path, sha256, recipe provenance
    frontend    sample_rate, n_fft, hop_length, n_mels, mel_filters (file); whisper: chunk_seconds and
                context (the window policy); lstm-ctc: stack (mel frames per step)
    tokenizer   byte-level-bpe: tokens (file), special {name: id}; characters: alphabet, blank
    decoder     whisper: the special and suppressed tokens of decoding; lstm-ctc: {type: ctc, defaults}
    decoding    the runtime's recorded settings: guards, hotword_bonus, hotword_prompt,
                grammar_threshold, short_window_beam
    files       {name: {bytes, sha256}}: every file the bundle loads, checked before loading
    evaluation  {set: {wer, words, …}}: what was measured when it was built

Recipes add sections of their own (`adaptation`, `compression`); they stay in `raw`. Manifests written
before `format_version` existed are version 0; a runtime reads every version up to its own.

A manifest is not trusted: reading one checks every section the runtime uses against the types of the
dataclasses below (`conform`), with ranges where a wrong number would fail deep inside decoding (positive
dimensions, token ids inside the vocabulary), and every file it names is a plain name inside the bundle's
folder (`plain_file_name`). A malformed manifest is one BundleError that names the key. The check is these
few functions, not a schema library: msgspec has no armv7 wheel (the Pi Zero's OS), and jsonschema would
bring four packages to the device for what this does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from . import __version__
from .errors import BundleError
from .frontend import SAMPLE_RATE

FORMAT = "edge-asr-bundle"
# 2: the TFLite decoder has "prefill_" signatures beside its "decode_" ones, which a runtime of format 1
# would take for one-token steps.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FORMATS = ("onnx", "ort", "tflite")


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ModelSection:
    family: str
    precision: str
    parameters: int
    graphs: dict[str, dict[str, str]]  # format -> role -> file; a format the bundle lacks is absent
    graph_data: dict[str, list[str]]  # role -> files some ONNX tensors are kept in
    dims: dict[str, int] | None  # whisper
    state: list[str] | None  # lstm-ctc: the recurrent state's tensor names, if the graph names them
    tflite_max_tokens: int | None  # whisper on LiteRT: the decoder's fixed token capacity

    @classmethod
    def from_dict(cls, model: dict) -> ModelSection:
        model = conform(model, dict, "model")
        graphs = {"onnx": conform(model.get("graphs", {}), dict[str, str], "model.graphs")}
        for fmt in MODEL_FORMATS[1:]:
            if fmt in model:
                graphs[fmt] = conform(
                    conform(model[fmt], dict, f"model.{fmt}").get("graphs"), dict[str, str], f"model.{fmt}.graphs"
                )
        for fmt, roles in graphs.items():
            for role, name in roles.items():
                plain_file_name(name, f"model.{fmt}.graphs.{role}")
        graph_data = conform(model.get("graph_data", {}), dict[str, list[str]], "model.graph_data")
        for role, names in graph_data.items():
            for name in names:
                plain_file_name(name, f"model.graph_data.{role}")
        family = conform(model.get("family", "whisper"), str, "model.family")  # before LSTM models: all Whisper
        if family not in FAMILY_TOKENIZERS:
            raise ManifestError(f"model.family must be {' or '.join(FAMILY_TOKENIZERS)}, not {family[:40]!r}")
        dims = conform(model.get("dims"), dict[str, int] | None, "model.dims")
        if family == "whisper":
            for key in WHISPER_DIMS:
                if not isinstance((dims or {}).get(key), int) or dims[key] < 1:
                    raise ManifestError(f"model.dims.{key} must be a positive integer")
        max_tokens = model.get("tflite", {}).get("max_tokens") if "tflite" in model else None
        return cls(
            family=family,
            precision=conform(model.get("precision"), str, "model.precision"),
            parameters=conform(model.get("parameters"), int, "model.parameters", minimum=0),
            graphs={f: g for f, g in graphs.items() if g},
            graph_data=graph_data,
            dims=dims,
            state=conform(model.get("state"), list[str] | None, "model.state"),
            tflite_max_tokens=conform(max_tokens, int | None, "model.tflite.max_tokens", minimum=1),
        )

    def files(self, fmt: str) -> set[str]:
        """Every file the graphs of format `fmt` load: the graphs, and for ONNX the files of their tensors."""
        data = self.graph_data.values() if fmt == "onnx" else ()
        return set(self.graphs.get(fmt, {}).values()).union(*data)


@dataclass(frozen=True)
class FrontendSection:
    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    mel_filters: str  # file
    stack: int  # mel frames per model step (lstm-ctc); 1 for Whisper
    context: dict | None  # whisper: the window policy (edge_asr.context); None: the 30 s model

    @classmethod
    def from_dict(cls, frontend: dict) -> FrontendSection:
        frontend = conform(frontend, dict, "frontend")
        positive = {k: conform(frontend.get(k), int, f"frontend.{k}", minimum=1) for k in FRONTEND_SIZES}
        if positive["sample_rate"] != SAMPLE_RATE:  # every source resamples to this rate, every model takes it
            raise ManifestError(f"frontend.sample_rate must be {SAMPLE_RATE}, not {positive['sample_rate']}")
        return cls(
            **positive,
            mel_filters=plain_file_name(frontend.get("mel_filters"), "frontend.mel_filters"),
            stack=conform(frontend.get("stack", 1), int, "frontend.stack", minimum=1),
            context=check_context(frontend.get("context")),
        )


@dataclass(frozen=True)
class TokenizerSection:
    type: str  # "byte-level-bpe" (Whisper) or "characters" (CTC)
    tokens: str | None = None  # byte-level-bpe: the file of token strings
    special: dict[str, int] = field(default_factory=dict)
    alphabet: str | None = None  # characters: index -> character, 0 the blank
    blank: int = 0

    @classmethod
    def from_dict(cls, tokenizer: dict) -> TokenizerSection:
        section = conform_fields(cls, tokenizer, "tokenizer")
        if section.type == "byte-level-bpe":
            plain_file_name(section.tokens, "tokenizer.tokens")
            if "eot" not in section.special:
                raise ManifestError("tokenizer.special.eot is missing")
        elif section.type != "characters":
            raise ManifestError(f"tokenizer.type must be byte-level-bpe or characters, not {section.type[:40]!r}")
        elif not section.alphabet or not 0 <= section.blank < len(section.alphabet):
            raise ManifestError("tokenizer.alphabet must list the characters, with the blank's index inside it")
        return section


@dataclass(frozen=True)
class DecodingSection:
    """Settings recorded at build time, which flags and the daemon's configuration override."""

    guards: dict = field(default_factory=dict)
    hotword_bonus: float | None = None
    hotword_prompt: bool | None = None
    grammar_threshold: float | None = None
    short_window_beam: dict | None = None  # {max_seconds, beam_size}

    @classmethod
    def from_dict(cls, decoding: dict) -> DecodingSection:
        section = conform_fields(cls, decoding, "decoding")
        beam = section.short_window_beam
        if beam is not None:
            conform(beam.get("max_seconds"), float, "decoding.short_window_beam.max_seconds", minimum=0)
            conform(beam.get("beam_size"), int, "decoding.short_window_beam.beam_size", minimum=1)
        return section


@dataclass(frozen=True)
class Manifest:
    name: str
    format_version: int
    model: ModelSection
    frontend: FrontendSection
    tokenizer: TokenizerSection
    decoder: dict  # the family's decoder contract, passed whole to its decoder
    decoding: DecodingSection
    files: dict[str, FileRecord]
    evaluation: dict
    raw: dict = field(repr=False)  # the JSON as written: provenance, recipe sections, `edge-asr info --json`

    @classmethod
    def from_dict(cls, data: dict, where: str | Path = "manifest") -> Manifest:
        """The typed manifest of `data`; a missing or malformed section is a BundleError naming it."""
        if data.get("format") != FORMAT:
            raise BundleError(f"{where}: not an edge-asr bundle (format {data.get('format')!r})")
        version = data.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(f"{where}: bundle format {version} is newer than this runtime reads")
        try:
            model = ModelSection.from_dict(data.get("model"))
            tokenizer = TokenizerSection.from_dict(data.get("tokenizer"))
            if tokenizer.type != FAMILY_TOKENIZERS[model.family]:
                raise ManifestError(
                    f"tokenizer.type must be {FAMILY_TOKENIZERS[model.family]} for a {model.family} model"
                )
            decoder = conform(data.get("decoder", {}), dict, "decoder")
            if model.family == "whisper":
                check_whisper_decoder(decoder, model.dims["n_vocab"])
            else:  # lstm-ctc: the decoding defaults it was built with (`ctc_transcriber.CtcOptions`)
                defaults = conform(decoder.get("defaults", {}), dict, "decoder.defaults")
                conform(defaults.get("beam", 0), int, "decoder.defaults.beam", minimum=0)
                conform(defaults.get("bias", 1.0), float, "decoder.defaults.bias")
                conform(defaults.get("bias_words", []), list[str], "decoder.defaults.bias_words")
            manifest = cls(
                name=conform(data.get("name"), str, "name"),
                format_version=version,
                model=model,
                frontend=FrontendSection.from_dict(data.get("frontend")),
                tokenizer=tokenizer,
                decoder=decoder,
                decoding=DecodingSection.from_dict(data.get("decoding", {})),
                files={
                    plain_file_name(name, "files"): FileRecord(
                        conform(record.get("bytes"), int, f"files.{name}.bytes", minimum=0),
                        conform(record.get("sha256"), str, f"files.{name}.sha256"),
                    )
                    for name, record in conform(data.get("files"), dict[str, dict], "files").items()
                },
                evaluation=conform(data.get("evaluation", {}), dict, "evaluation"),
                raw=data,
            )
        except ManifestError as e:
            raise BundleError(f"{where}: malformed manifest: {e}") from None
        return manifest

    @property
    def formats(self) -> list[str]:
        return [f for f in MODEL_FORMATS if f in self.model.graphs]

    def listed_files(self) -> set[str]:
        """The files the manifest points to, each of which must have a checksum in `files`."""
        listed = {self.frontend.mel_filters}.union(*(self.model.files(f) for f in MODEL_FORMATS))
        return listed | ({self.tokenizer.tokens} if self.tokenizer.tokens else set())


# -- the schema check ------------------------------------------------------------------------------------------

FAMILY_TOKENIZERS = {"whisper": "byte-level-bpe", "lstm-ctc": "characters"}
WHISPER_DIMS = ("n_mels", "n_vocab", "n_text_ctx", "n_text_layer", "n_audio_ctx")
FRONTEND_SIZES = ("sample_rate", "n_fft", "hop_length", "n_mels")
# A file a bundle loads: one plain name in its folder (no separator, no "..", not hidden, not absolute).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")


class ManifestError(ValueError):
    """One key of a manifest that is missing, of the wrong type or out of range (Manifest.from_dict adds where)."""


def plain_file_name(name, key: str) -> str:
    """`name` if it is a plain file name, which can only mean a file inside the bundle's own folder."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise ManifestError(f"{key} must name a file inside the bundle's folder, not {str(name)[:80]!r}")
    return name


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def conform(value, hint, key: str, minimum: float | None = None):
    """`value` checked as JSON of type `hint` (bool, int, float, str, dict, list[X], dict[str, X], tuple[X, ...],
    X | None), with ints taken for floats; a ManifestError names `key` and what was wrong."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return conform(value, hint, key, minimum)
    if value is None:
        raise ManifestError(f"{key} is missing or null (expected {_type_name(hint)})")
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise ManifestError(f"{key} must be {_type_name(hint)}, not {type(value).__name__}")
    if expected is float and not math.isfinite(value):
        raise ManifestError(f"{key} must be a finite number, not {value}")
    if minimum is not None and expected in (int, float) and value < minimum:
        raise ManifestError(f"{key} must be at least {minimum}, not {value}")
    if origin in (list, tuple):
        return expected(conform(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        return {conform(k, args[0], f"{key} key"): conform(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return value


def conform_fields(section: type, data, key: str):
    """A dataclass `section` from the keys of `data` that are its fields, each checked against its annotation;
    keys a newer builder added are left to `raw`."""
    data = conform(data, dict, key)
    hints = typing.get_type_hints(section)
    for f in fields(section):
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ManifestError(f"{key}.{f.name} is missing")
    return section(
        **{f.name: conform(data[f.name], hints[f.name], f"{key}.{f.name}") for f in fields(section) if f.name in data}
    )


def check_context(context) -> dict | None:
    """The window policy (`edge_asr.context`): a mode, a margin and floor, and buckets up to 30 s."""
    if not conform(context, dict | None, "frontend.context"):
        return None
    if conform(context.get("mode"), str, "frontend.context.mode") not in ("full", "auto", "fixed"):
        raise ManifestError(f"frontend.context.mode must be full, auto or fixed, not {context['mode'][:20]!r}")
    for key in ("margin_s", "floor_s"):
        conform(context.get(key), float, f"frontend.context.{key}", minimum=0)
    buckets = conform(context.get("buckets_s"), list[float], "frontend.context.buckets_s")
    if not buckets or not all(0 < b <= 30 for b in buckets):
        raise ManifestError("frontend.context.buckets_s must be window lengths in (0, 30] seconds")
    return context


def check_whisper_decoder(decoder: dict, n_vocab: int) -> None:
    """The Whisper decoder contract: its special, suppressed and prompt tokens, all inside the vocabulary."""
    special = conform(decoder.get("special_tokens"), dict[str, int], "decoder.special_tokens")
    for name in ("eot", "sot", "no_timestamps", "timestamp_begin"):
        if name not in special:
            raise ManifestError(f"decoder.special_tokens.{name} is missing")
    listed = {
        key: conform(decoder.get(key), list[int], f"decoder.{key}")
        for key in ("prompt", "suppress_tokens", "suppress_blank")
    }
    for key, ids in [("special_tokens", special.values()), *listed.items()]:
        outside = [i for i in ids if not 0 <= i < n_vocab]
        if outside:
            raise ManifestError(f"decoder.{key} holds token {outside[0]}, outside the vocabulary of {n_vocab}")
    if not listed["prompt"]:
        raise ManifestError("decoder.prompt is empty")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def header(name: str) -> dict:
    """The first keys of every manifest: format, schema version, name, when and by what it was built."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "builder": f"edge-asr {__version__}",
    }


def file_records(folder: Path, names: list[str]) -> dict:
    """The manifest's record of each file: size and sha256, which the runtime checks before loading."""
    return {n: {"bytes": (Path(folder) / n).stat().st_size, "sha256": sha256_file(Path(folder) / n)} for n in names}


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise BundleError(f"{folder}: no such bundle directory (build one with `edge-asr build`)")
    if not path.exists():
        raise BundleError(f"{folder}: not a bundle (no {MANIFEST})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: corrupt manifest ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: corrupt manifest (not an object)")
    return Manifest.from_dict(data, folder)


def write_manifest(folder: Path, data: dict) -> Manifest:
    """Check that `data` reads back as a manifest, then write it atomically; returns the typed manifest."""
    manifest = Manifest.from_dict(data, folder)
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return manifest
