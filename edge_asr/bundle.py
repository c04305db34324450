"""A bundle is a folder with `manifest.json` and the files it lists, each checked against its sha256.

The manifest is the bundle's self-description: model family and dimensions, precision, provenance of
the source weights, the frontend's parameters, the decoder's special and suppressed tokens, and any
measurements recorded when it was built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError
from .tokenizer import Tokenizer

FORMAT = "edge-asr-bundle"
# 2: the TFLite decoder has "prefill_" signatures beside its "decode_" ones, which a runtime of format 1
# would take for one-token steps. A runtime reads every version up to its own.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FORMATS = ("onnx", "ort", "tflite")


def model_graphs(manifest: dict, fmt: str) -> dict[str, str]:
    """Role -> file of the graphs in format `fmt` ({} if the bundle has none): ONNX's are the manifest's
    `model.graphs`, the other formats' `model.<fmt>.graphs`."""
    model = manifest["model"]
    return model.get("graphs", {}) if fmt == "onnx" else model.get(fmt, {}).get("graphs", {})


def model_files(manifest: dict, fmt: str) -> set[str]:
    """Every file the graphs of format `fmt` load: the graphs, and for ONNX the files some of their tensors
    are kept in (`model.graph_data`, role -> names)."""
    data = manifest["model"].get("graph_data", {}) if fmt == "onnx" else {}
    return set(model_graphs(manifest, fmt).values()).union(*data.values())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise BundleError(f"{path}: no such bundle directory (build one with `edge-asr build`)")
    if not manifest_path.exists():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: corrupt manifest ({e.__class__.__name__})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not an edge-asr bundle (format {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest['format_version']} is newer than this runtime reads")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Refuse a bundle whose files are missing or differ from what the manifest recorded."""
    for name, info in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise BundleError(f"{path}: missing {name}; the bundle is incomplete")
        if file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest; the bundle was modified")


@dataclass
class Bundle:
    path: Path
    manifest: dict
    tokenizer: Tokenizer | None  # Whisper's byte-level BPE; None for character models (lstm-ctc)
    mel_filters: np.ndarray

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        if verify:
            verify_files(path, manifest)
        frontend, tokenizer = manifest["frontend"], manifest["tokenizer"]
        listed = {frontend["mel_filters"]}.union(*(model_files(manifest, f) for f in MODEL_FORMATS))
        listed |= {tokenizer["tokens"]} if "tokens" in tokenizer else set()
        unlisted = listed - set(manifest["files"])
        if unlisted:  # a file without a checksum could be swapped unnoticed
            raise BundleError(f"{path}: manifest lists no checksum for {', '.join(sorted(unlisted))}")
        mel_filters = np.load(path / frontend["mel_filters"], allow_pickle=False).astype(np.float32)
        if tokenizer.get("type") != "byte-level-bpe":
            return cls(path, manifest, None, mel_filters)
        tokens = json.loads((path / tokenizer["tokens"]).read_text(encoding="utf-8"))
        return cls(path, manifest, Tokenizer(tokens, tokenizer["special"]), mel_filters)

    @property
    def family(self) -> str:
        return self.manifest["model"].get("family", "whisper")

    @property
    def formats(self) -> list[str]:
        """The model formats this bundle carries: "onnx", and "ort" and "tflite" when built with them (a bundle
        packaged for a device may carry only the one its backend runs)."""
        return [f for f in MODEL_FORMATS if model_graphs(self.manifest, f)]

    def file(self, role: str, fmt: str = "onnx") -> Path:
        """The file of graph `role` ("encoder", "decoder", "acoustic") in format `fmt`."""
        if fmt not in self.formats:
            raise BundleError(
                f"{self.path}: this bundle has no {fmt} models (it has {', '.join(self.formats)}); "
                f"rebuild it with --formats {fmt}"
            )
        return self.path / model_graphs(self.manifest, fmt)[role]

    @property
    def size_bytes(self) -> int:
        return sum(info["bytes"] for info in self.manifest["files"].values())

    def model_bytes(self, fmt: str = "onnx") -> int:
        """What one backend loads: the graphs of format `fmt` and the files every format shares."""
        others = set().union(*(model_files(self.manifest, f) for f in self.formats if f != fmt))
        return sum(info["bytes"] for name, info in self.manifest["files"].items() if name not in others)

    @property
    def parameters(self) -> int:
        return self.manifest["model"]["parameters"]
