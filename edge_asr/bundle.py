"""A bundle is a folder with `manifest.json` and the files it lists, each checked against its sha256.

The manifest (`edge_asr.manifest`, typed) is the bundle's self-description: model family and dimensions,
precision, provenance of the source weights, the frontend's parameters, the decoder's special and
suppressed tokens, and any measurements recorded when it was built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FORMATS,
    Manifest,
    ManifestError,
    plain_file_name,
    read_manifest,
    sha256_file,
)
from .onnx_refs import MalformedGraph, external_locations
from .tokenizer import BYTE_ALPHABET, Tokenizer

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MODEL_FORMATS", "Bundle", "read_manifest", "sha256_file"]


def check_containment(path: Path, manifest: Manifest) -> None:
    """Refuse a bundle that would make the runtime open a file outside its folder: a symlink out of it, or an
    ONNX graph whose tensors are kept in a file that is not a checksummed file of the bundle. (The manifest's
    own names are plain names, `manifest.plain_file_name`; ORT-format and TFLite models hold their tensors
    inside the file.)"""
    folder = path.resolve()
    for entry in path.iterdir():
        if entry.is_symlink() and folder not in entry.resolve().parents:
            raise BundleError(f"{path}: {entry.name} links outside the bundle's folder")
    for role, name in manifest.model.graphs.get("onnx", {}).items():
        if not (path / name).is_file():
            continue  # verify_files names it; a bundle loaded unverified fails in its backend
        try:
            locations = external_locations(path / name)
        except (MalformedGraph, OSError) as e:
            raise BundleError(f"{path}: {name} is not a readable ONNX graph ({e})") from None
        for location in sorted(locations):
            try:
                plain_file_name(location, f"{name}'s external data")
            except ManifestError as e:
                raise BundleError(f"{path}: {e}") from None
            if location not in manifest.files:
                raise BundleError(
                    f"{path}: {name} keeps tensors in {location}, which the manifest lists no checksum for"
                )


def verify_files(path: Path, manifest: Manifest) -> None:
    """Refuse a bundle whose files are missing or differ from what the manifest recorded."""
    for name, record in manifest.files.items():
        file = path / name
        if not file.exists():
            raise BundleError(f"{path}: missing {name}; the bundle is incomplete")
        if file.stat().st_size != record.bytes or sha256_file(file) != record.sha256:
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest; the bundle was modified")


def _read_mel_filters(path: Path, manifest: Manifest) -> np.ndarray:
    """The mel filterbank: (n_mels, n_fft / 2 + 1) finite numbers."""
    frontend = manifest.frontend
    name = frontend.mel_filters
    try:
        filters = np.load(path / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BundleError(f"{path}: {name} is not a readable .npy file ({e.__class__.__name__})") from None
    shape = (frontend.n_mels, frontend.n_fft // 2 + 1)
    if filters.shape != shape or filters.dtype.kind != "f" or not np.isfinite(filters).all():
        raise BundleError(f"{path}: {name} must hold {shape[0]} x {shape[1]} finite numbers")
    return filters.astype(np.float32)


def _read_tokens(path: Path, manifest: Manifest) -> list[str]:
    """The token strings of a byte-level BPE: one per id below end-of-text, in GPT-2's byte alphabet."""
    name, eot = manifest.tokenizer.tokens, manifest.tokenizer.special["eot"]
    try:
        tokens = json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 errors
        raise BundleError(f"{path}: {name} is not readable JSON ({e.__class__.__name__})") from None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or not 0 < eot <= len(tokens):
        raise BundleError(f"{path}: {name} must list at least the {eot} token strings below end-of-text")
    if not set("".join(tokens[:eot])) <= BYTE_ALPHABET:
        raise BundleError(f"{path}: {name} spells a token outside the byte-level alphabet")
    return tokens


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    tokenizer: Tokenizer | None  # Whisper's byte-level BPE; None for character models (lstm-ctc)
    mel_filters: np.ndarray

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        check_containment(path, manifest)
        if verify:
            verify_files(path, manifest)
        unlisted = manifest.listed_files() - set(manifest.files)
        if unlisted:  # a file without a checksum could be swapped unnoticed
            raise BundleError(f"{path}: manifest lists no checksum for {', '.join(sorted(unlisted))}")
        mel_filters = _read_mel_filters(path, manifest)
        tokenizer = manifest.tokenizer
        if tokenizer.type != "byte-level-bpe":
            return cls(path, manifest, None, mel_filters)
        return cls(path, manifest, Tokenizer(_read_tokens(path, manifest), tokenizer.special), mel_filters)

    @property
    def family(self) -> str:
        return self.manifest.model.family

    @property
    def formats(self) -> list[str]:
        """The model formats this bundle carries: "onnx", and "ort" and "tflite" when built with them (a bundle
        packaged for a device may carry only the one its backend runs)."""
        return self.manifest.formats

    def file(self, role: str, fmt: str = "onnx") -> Path:
        """The file of graph `role` ("encoder", "decoder", "acoustic") in format `fmt`."""
        if fmt not in self.formats:
            raise BundleError(
                f"{self.path}: this bundle has no {fmt} models (it has {', '.join(self.formats)}); "
                f"rebuild it with --formats {fmt}"
            )
        return self.path / self.manifest.model.graphs[fmt][role]

    @property
    def size_bytes(self) -> int:
        return sum(record.bytes for record in self.manifest.files.values())

    def model_bytes(self, fmt: str = "onnx") -> int:
        """What one backend loads: the graphs of format `fmt` and the files every format shares."""
        others = set().union(*(self.manifest.model.files(f) for f in self.formats if f != fmt))
        return sum(record.bytes for name, record in self.manifest.files.items() if name not in others)

    @property
    def parameters(self) -> int:
        return self.manifest.model.parameters
