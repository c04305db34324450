"""Adapt pass for dynamic audio context: Whisper that sees the audio's own length instead of 30 s.

Whisper was trained on 30 s windows only. Given fewer frames its decoder loses its footing and repeats
itself, so the model is adapted by reference matching (`matching.engine`): the reference is the unchanged model on
the 30 s window, the student the same model, with LoRA adapters, on a window of the clip's length plus a
margin, rounded up to one of the context policy's buckets (`edge_asr.context`). The student sees exactly
the padding the runtime applies (with margins drawn from a range, so the margin can be chosen afterwards),
and now and then any length up to 30 s, which is what re-decoding a growing utterance gives.

The result is a delta file (LoRA, float16 safetensors) with its recipe in the header. The build step merges
it into the weights before export (`build --context auto`), so bundles and graphs never see an adapter.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edge_asr.context import FRAMES_PER_SECOND, ContextPolicy
from edge_asr.frontend import N_FRAMES
from edge_asr_build.matching.engine import MatchConfig, match_reference
from edge_asr_build.recipes.run import RecipeRun, recipe_metadata, write_delta
from edge_asr_build.sources import load_whisper
from edge_asr_build.speech.training_audio import (
    AudioMix,
    HeldOutMix,
)

DELTA_DIR = Path(__file__).parent / "deltas"
DEFAULT_DELTA = DELTA_DIR / "tiny.en-context-auto.safetensors"


@dataclass(frozen=True)
class ContextRecipe:
    mix: AudioMix = field(default_factory=AudioMix)
    held_out: HeldOutMix = field(default_factory=HeldOutMix)
    # Sized to run on 2 CPU cores in under 30 minutes, data and reference states included.
    match: MatchConfig = field(
        default_factory=lambda: MatchConfig(
            steps=450, batch_size=8, learning_rate=2e-4, warmup_steps=30, checkpoint_every=50, eval_every=50
        )
    )
    policy_share: float = 0.75  # windows shaped as the runtime shapes them; the rest any length to 30 s
    max_margin_s: float = 1.5  # margins drawn from [0, max_margin_s] for those windows
    floor_s: float = 3.0  # the runtime's floor (ContextPolicy.auto)
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def training_frames(recipe: ContextRecipe) -> Callable[[int, np.random.Generator], int]:
    """The student's window length for a clip of `frames` frames: a bucketed window with a random margin, or
    now and then any even length between the clip's and 30 s."""
    runtime = replace(ContextPolicy.auto(), floor_s=recipe.floor_s)

    def frames_for(frames: int, rng: np.random.Generator) -> int:
        if rng.random() < recipe.policy_share:
            return replace(runtime, margin_s=float(rng.uniform(0, recipe.max_margin_s))).frames(frames * 160)
        low = max(frames, int(recipe.floor_s * FRAMES_PER_SECOND))
        return min(N_FRAMES, 2 * int(rng.integers(low // 2, N_FRAMES // 2 + 1)))

    return frames_for


def held_out_frames(policy: ContextPolicy) -> Callable[[int, np.random.Generator], int]:
    return lambda frames, rng: policy.frames(frames * 160)


def adapt_context(run: RecipeRun, recipe: ContextRecipe | None = None) -> dict:
    """Train the dynamic-context delta of `run.source`; writes `run.out` (safetensors, a JSON summary beside
    it) and returns its metadata.

    Reference items and the training checkpoint live in the work folder (default: $EDGE_ASR_HOME/adapt/KEY,
    KEY naming the source, recipe and audio). Reference items are always reused; with `run.resume`, so is
    the checkpoint of a stopped run, which then goes on where it was."""
    recipe = recipe or ContextRecipe()
    match = run.match(recipe.match)
    torch.manual_seed(match.seed)
    run.step(f"load {run.source}")
    loaded = load_whisper(run.source)
    started = time.time()
    work, train, held_out = run.reference_sets(loaded, recipe.mix, recipe.held_out, match.seed)
    prepared = time.time() - started
    run.step(f"match the reference ({match.steps} steps)")
    student = copy.deepcopy(loaded.model.eval())
    result = match_reference(
        student,
        train,
        match,
        training_frames(recipe),
        held_out,
        held_out_frames(ContextPolicy.auto()),
        checkpoint=run.checkpoint(work / "checkpoint.pt"),
        log=run.log,
    )
    metadata = recipe_metadata(
        "context-lora",
        loaded,
        match,
        replace(recipe, match=match).to_dict(),
        run,
        {"train": len(train), "held_out": len(held_out)},
        result,
        prepared,
        held_out_policy=ContextPolicy.auto().to_dict(),
    )
    # The reference model's copy in the student had adapters added in place: save them, not the merged weights.
    write_delta(student, run.out, metadata)
    return metadata
