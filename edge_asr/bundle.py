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
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FORMATS, Manifest, read_manifest, sha256_file
from .tokenizer import Tokenizer

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MODEL_FORMATS", "Bundle", "read_manifest", "sha256_file"]


def verify_files(path: Path, manifest: Manifest) -> None:
    """Refuse a bundle whose files are missing or differ from what the manifest recorded."""
    for name, record in manifest.files.items():
        file = path / name
        if not file.exists():
            raise BundleError(f"{path}: missing {name}; the bundle is incomplete")
        if file.stat().st_size != record.bytes or sha256_file(file) != record.sha256:
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest; the bundle was modified")


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
        if verify:
            verify_files(path, manifest)
        unlisted = manifest.listed_files() - set(manifest.files)
        if unlisted:  # a file without a checksum could be swapped unnoticed
            raise BundleError(f"{path}: manifest lists no checksum for {', '.join(sorted(unlisted))}")
        mel_filters = np.load(path / manifest.frontend.mel_filters, allow_pickle=False).astype(np.float32)
        tokenizer = manifest.tokenizer
        if tokenizer.type != "byte-level-bpe":
            return cls(path, manifest, None, mel_filters)
        tokens = json.loads((path / tokenizer.tokens).read_text(encoding="utf-8"))
        return cls(path, manifest, Tokenizer(tokens, tokenizer.special), mel_filters)

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
