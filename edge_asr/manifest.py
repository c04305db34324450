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
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import __version__
from .errors import BundleError

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
        graphs = {"onnx": model.get("graphs", {})} | {f: model[f]["graphs"] for f in MODEL_FORMATS[1:] if f in model}
        return cls(
            family=model.get("family", "whisper"),  # bundles from before LSTM models were all Whisper
            precision=model["precision"],
            parameters=int(model["parameters"]),
            graphs={f: dict(g) for f, g in graphs.items() if g},
            graph_data=model.get("graph_data", {}),
            dims=model.get("dims"),
            state=model.get("state"),
            tflite_max_tokens=model.get("tflite", {}).get("max_tokens"),
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
        return cls(
            sample_rate=int(frontend["sample_rate"]),
            n_fft=int(frontend["n_fft"]),
            hop_length=int(frontend["hop_length"]),
            n_mels=int(frontend["n_mels"]),
            mel_filters=frontend["mel_filters"],
            stack=int(frontend.get("stack", 1)),
            context=frontend.get("context") or None,
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
        return cls(**_known_fields(cls, tokenizer))


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
        return cls(**_known_fields(cls, decoding))


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
        section = "name"
        try:
            name = str(data["name"])
            section = "model"
            model = ModelSection.from_dict(data["model"])
            section = "frontend"
            frontend = FrontendSection.from_dict(data["frontend"])
            section = "tokenizer"
            tokenizer = TokenizerSection.from_dict(data["tokenizer"])
            if tokenizer.type == "byte-level-bpe" and not tokenizer.tokens:
                raise KeyError("tokens")
            section = "decoding"
            decoding = DecodingSection.from_dict(data.get("decoding", {}))
            section = "files"
            files = {n: FileRecord(int(f["bytes"]), str(f["sha256"])) for n, f in data["files"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{where}: malformed manifest ({section}: {e.__class__.__name__} {e})") from None
        return cls(
            name=name,
            format_version=version,
            model=model,
            frontend=frontend,
            tokenizer=tokenizer,
            decoder=data.get("decoder", {}),
            decoding=decoding,
            files=files,
            evaluation=data.get("evaluation", {}),
            raw=data,
        )

    @property
    def formats(self) -> list[str]:
        return [f for f in MODEL_FORMATS if f in self.model.graphs]

    def listed_files(self) -> set[str]:
        """The files the manifest points to, each of which must have a checksum in `files`."""
        listed = {self.frontend.mel_filters}.union(*(self.model.files(f) for f in MODEL_FORMATS))
        return listed | ({self.tokenizer.tokens} if self.tokenizer.tokens else set())


def _known_fields(section: type, data: dict) -> dict:
    """The keys of `data` that are fields of `section`; keys a newer builder added are left to `raw`."""
    return {f.name: data[f.name] for f in fields(section) if f.name in data}


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
