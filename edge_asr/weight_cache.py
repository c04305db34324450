"""XNNPACK's packed weights kept on disk between runs, for LiteRT's CompiledModel API.

XNNPACK repacks every weight of a model into its own layout when the model loads. Packed in memory, a
process holds a build buffer beside the packed copy and reads every weight page of the .tflite file to
fill it: for tiny.en's decoder that is 20 MB more resident after loading and 40 MB more at the peak than a
process that maps packed weights from a file (`benchmarks/memory.py`). So the first load packs into a file,
and every later load maps it; the .tflite weights are then never read.

The file lives in edge-asr's home (`$EDGE_ASR_HOME/xnnpack/`), named after the model file's sha256 (from the
manifest) and the LiteRT version, so that a changed model or runtime never meets a stale cache. XNNPACK
checks the file's header but not the weights in it, so a sidecar holds the file's sha256, written once the
file is complete, and checked at every load; a cache that fails the check is packed again. Where the home
cannot be written, the weights are packed in memory, as before.
"""

from __future__ import annotations

import contextlib
import os
from importlib import metadata
from pathlib import Path

from .manifest import sha256_file
from .paths import home

IN_MEMORY = ":memory:"


def _litert_version() -> str:
    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return "unknown"


def _sidecar(cache: Path) -> Path:
    """The file that holds the cache's sha256, written once the cache is complete."""
    return cache.with_suffix(".sha256")


def _is_intact(cache: Path) -> bool:
    try:
        return _sidecar(cache).read_text().strip() == sha256_file(cache)
    except OSError:
        return False


class WeightCache:
    """Where one model's packed weights go: `path` for LiteRT's CPU options, then `keep()` once the model
    has loaded, or `discard()` if it failed to. A new cache is packed under a name of this process' own and
    moved into place, so that two processes starting at once never read each other's half-written file."""

    def __init__(self, model_sha256: str):
        self.path, self._building = IN_MEMORY, None
        folder = home() / "xnnpack"
        cache = folder / f"{model_sha256[:32]}-litert{_litert_version()}.xnnpack"
        if _is_intact(cache):
            self.path = str(cache)
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            building = folder / f".{cache.name}.{os.getpid()}"
            building.unlink(missing_ok=True)
            building.touch()
        except OSError:
            return  # a read-only home: packed in memory
        building.unlink()
        self.path, self._building, self._cache = str(building), building, cache

    def keep(self) -> None:
        """Move a newly packed cache into place with its checksum (no-op for a reused or in-memory one)."""
        if self._building is None:
            return
        building, self._building = self._building, None
        sidecar = _sidecar(self._cache)
        pending = sidecar.with_name(f"{sidecar.name}.{os.getpid()}")
        try:
            digest = sha256_file(building)
            os.replace(building, self._cache)
            pending.write_text(digest + "\n")
            os.replace(pending, sidecar)
        except OSError:  # a full disk: this process keeps its mapping, the next one packs again
            for leftover in (building, pending):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def discard(self) -> None:
        """Remove what a load that failed may have begun packing."""
        if self._building is not None:
            with contextlib.suppress(OSError):
                self._building.unlink()
            self._building = None
