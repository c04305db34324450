"""The kinds of delta file the recipes write, and how the build step applies each: the model it makes from a
loaded Whisper and what the bundle's manifest records of it. A new recipe adds its kind here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_asr.bundle import sha256_file
from edge_asr.errors import EdgeAsrError
from edge_asr_build.matching.lora import apply_delta, delta_metadata
from edge_asr_build.recipes.compact import compact_model
from edge_asr_build.recipes.prune import pruned_model
from edge_asr_build.sources import LoadedWhisper


def merged_lora(loaded: LoadedWhisper, delta: Path, step: Callable[[str], None]) -> tuple[object, dict]:
    """LoRA adapters merged into the loaded model itself (in place): the dynamic-context delta."""
    metadata = apply_delta(loaded.model, delta)
    result = metadata.get("result", {})
    return loaded.model, {
        "delta": Path(delta).name,
        "sha256": sha256_file(Path(delta)),
        "kind": metadata.get("kind"),
        "rank": metadata.get("rank"),
        "recipe": metadata.get("recipe"),
        "corpora": metadata.get("corpora"),
        "held_out_loss": {
            "before": result.get("held_out_before"),
            "after": result.get("held_out_best"),
            "best_step": result.get("best_step"),
        },
        "seconds": metadata.get("seconds"),
    }


@dataclass(frozen=True)
class DeltaKind:
    made_by: str  # the command that writes it
    # (loaded Whisper, delta file, progress) -> (the model to export, the manifest's "adaptation" section)
    apply: Callable[[LoadedWhisper, Path, Callable[[str], None]], tuple[object, dict]]


DELTA_KINDS = {
    "context-lora": DeltaKind("edge-asr adapt", merged_lora),
    "compact-lora": DeltaKind("edge-asr recover", compact_model),
    "pruned-context-lora": DeltaKind("edge-asr prune", lambda loaded, delta, step: pruned_model(loaded, delta)),
}


def apply_delta_file(
    loaded: LoadedWhisper, delta: Path, step: Callable[[str], None], expect: str | None = None
) -> dict:
    """Apply the delta file `delta` to `loaded` as its kind says (`loaded.model` becomes the model to export);
    returns the manifest's record of it. `expect`: the kind the caller needs."""
    kind = delta_metadata(Path(delta)).get("kind", "context-lora")  # deltas from before kinds were adapters
    if expect and kind != expect:
        raise EdgeAsrError(
            f"{delta} is not a {expect} delta (kind {kind!r}, made by {DELTA_KINDS[kind].made_by})"
            if kind in DELTA_KINDS
            else f"{delta} is not a {expect} delta (kind {kind!r})"
        )
    if kind not in DELTA_KINDS:
        raise EdgeAsrError(f"{delta}: unknown delta kind {kind!r} (known: {', '.join(DELTA_KINDS)})")
    loaded.model, summary = DELTA_KINDS[kind].apply(loaded, Path(delta), step)
    return summary
