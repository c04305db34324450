"""Compact Whisper: activation-aware factors, ranks from measured error, recovery by reference matching.

The recipe, in the order of the build step's passes:

  1. calibrate  synthesized, seeded calibration clips (`calibration.calibration_clips`); the reference's
                transcripts of them; the input moments of every linear layer and of the final state.
  2. measure    each factorable matrix alone at each candidate rank, scored by the logit KL against the
                reference (`compress.measure_groups`); ranks allocated greedily to the parameter budget
                (`compress.allocate_measured`). Done once per recipe: the ranks ship in the delta.
  3. factor     every matrix by the SVD of its whitened form (`compress.apply_structure` with moments).
                The delta records the factors' fingerprint (`compress.factors_fingerprint`), and is only
                applied to factors within `compress.FACTORS_TOLERANCE` of it: the same factors up to the
                last bits another CPU's kernels change, never those of another calibration or model.
  4. recover    LoRA adapters on the factored decoder trained by reference matching (`matching.engine`): the
                reference is the unchanged model on its 30 s window, the data the adapt pass's mix of
                synthesized and recorded speech; the held-out loss selects the state kept.

`compact_model` rebuilds 1 and 3 and applies a shipped delta (2 and 4 stored in it): what `build --compact`
does in minutes. `recover_compact` runs the whole recipe and writes such a delta.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from edge_asr.bundle import sha256_file
from edge_asr.errors import EdgeAsrError
from edge_asr.frontend import N_FFT, N_FRAMES, SAMPLE_RATE
from edge_asr_build.compression.calibration import CalibrationMix, Distortion, MomentRecorder, calibration_clips
from edge_asr_build.compression.compress import (
    FACTORS_TOLERANCE,
    CompressionReport,
    apply_structure,
    factors_fingerprint,
    fingerprint_distance,
    structure_of,
)
from edge_asr_build.compression.factors import DEFAULT_PARTS
from edge_asr_build.compression.ranks import allocate_measured, collect_groups, measure_groups
from edge_asr_build.matching.data import _encoder, items_key, reference_items
from edge_asr_build.matching.engine import (
    MatchConfig,
    MatchResult,
    held_out_loss,
    match_reference,
    trainable_parameters,
)
from edge_asr_build.matching.lora import apply_delta, delta_metadata
from edge_asr_build.recipes.run import RecipeRun, recipe_metadata, write_delta
from edge_asr_build.sources import load_whisper
from edge_asr_build.speech.training_audio import AudioMix, HeldOutMix
from edge_asr_build.whisper.mel import mel_filters
from edge_asr_build.whisper.vocabulary import decoding_rules

DELTA_DIR = Path(__file__).parent / "deltas"
DEFAULT_COMPACT_DELTA = DELTA_DIR / "tiny.en-compact.safetensors"


@dataclass(frozen=True)
class CompactRecipe:
    keep: float = 0.70  # of all parameters (embedding, norms, positions included)
    parts: tuple[str, ...] = DEFAULT_PARTS
    # The embedding's exact rows and tail rank are fixed, chosen on the held-out sets: its output projection
    # matters for rare words far more than the calibration's logit KL shows (see the README).
    frequent_tokens: int = 24000
    embedding_rank: int = 64
    calibration: CalibrationMix = field(default_factory=CalibrationMix)
    measure_clips: int = 32  # calibration clips the rank measurements are scored on
    mix: AudioMix = field(default_factory=AudioMix)
    held_out: HeldOutMix = field(default_factory=HeldOutMix)
    # LoRA on the decoder (the factored part) and the embedding's shared projection, low learning rate, with
    # the next-token KL beside the hidden states; sized for 2 CPU cores in under 30 minutes.
    # Recovery is off by default: on the held-out sets, 300 steps lowered the matching loss by a quarter but
    # raised WER (30.53% against 28.72% for the factors alone; README). `edge-asr recover --steps 300` runs it.
    match: MatchConfig = field(
        default_factory=lambda: MatchConfig(
            steps=0,
            batch_size=8,
            learning_rate=1e-4,
            warmup_steps=30,
            lora_rank=16,
            lora_alpha=16.0,
            parts=("decoder",),
            checkpoint_every=50,
            eval_every=50,
            output_weight=0.5,
        )
    )
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Calibration:
    items: list  # ReferenceItems of the calibration clips
    moments: dict  # layer name -> InputMoments


def calibrate(
    loaded, mix: CalibrationMix, step: Callable[[str], None] = lambda m: None, parts: tuple[str, ...] = DEFAULT_PARTS
) -> Calibration:
    """Calibration clips, the reference's transcripts of them, and the input moments of every layer."""

    step(f"synthesize {mix.sentences + mix.short_utterances} calibration clips")
    clips = calibration_clips(mix)
    reference = loaded.model.eval()
    # The input moments of every layer are recorded on the reference pass itself; none for layer pruning,
    # which measures whole blocks, not inputs.
    sides = tuple(sorted({"encoder" if p.startswith("encoder") else "decoder" for p in parts}))
    step("reference transcripts" + (" and input moments" if parts else "") + " of the calibration clips")
    with MomentRecorder(reference, sides) as recorder:
        items = reference_items(
            reference,
            clips,
            mel_filters(SAMPLE_RATE, N_FFT, reference.dims.n_mels),
            decoding_rules(loaded),
            _encoder(loaded.tokenizer_json),
            [],
            mode_shares={"plain": 1.0},
            observer=recorder if parts else None,
        )
    return Calibration(items, recorder.moments)


def measure_structure(
    loaded, recipe: CompactRecipe, calibration: Calibration, device: str = "cpu", progress=None
) -> tuple[dict, CompressionReport]:
    """The ranks of `recipe.keep`: the embedding at the recipe's rank, every other matrix from measured
    distortions. Returns (structure, report)."""
    model = loaded.model
    distortion = Distortion.of_reference(model, calibration.items[: recipe.measure_clips], device=device)
    groups = collect_groups(model, recipe.parts, "joint", recipe.frequent_tokens, calibration.moments)
    measured = [g for g in groups if g.kind != "embedding"]
    for g in groups:
        if g.kind == "embedding":
            g.rank = recipe.embedding_rank
    measure_groups(model, measured, distortion, calibration.moments, recipe.frequent_tokens, progress)
    before = model.parameter_count()
    # everything the measured groups do not hold: the unfactored weights and the embedding at its rank
    fixed = before - sum(g.dense_cost for g in groups) + sum(g.params for g in groups if g.kind == "embedding")
    allocate_measured(measured, int(recipe.keep * before) - fixed)
    structure = structure_of(groups, recipe.frequent_tokens, model.dims)
    after = apply_structure(copy.deepcopy(model), structure, moments=calibration.moments).parameter_count()
    return structure, CompressionReport(before, after, groups)


def factored(loaded, structure: dict, calibration: Calibration):
    """The activation-aware factored copy of the loaded model."""
    return apply_structure(copy.deepcopy(loaded.model), structure, moments=calibration.moments).eval()


def compact_model(
    loaded,
    delta: Path = DEFAULT_COMPACT_DELTA,
    step: Callable[[str], None] = lambda m: None,
    calibration: Calibration | None = None,
):
    """The compact model of `delta` (from `recover_compact`): calibration and factors rebuilt from the recipe
    in the delta (or from `calibration`), checked against its source and its factors' fingerprint, then its
    adapters merged. Returns (model, manifest summary)."""

    metadata = delta_metadata(Path(delta))
    if metadata.get("kind") != "compact-lora":
        raise EdgeAsrError(f"{delta} is not a compact delta (kind {metadata.get('kind')!r})")
    if metadata["source"].get("sha256") != loaded.source.get("sha256"):
        raise EdgeAsrError(
            f"{Path(delta).name} was made from another model (sha256 "
            f"{str(metadata['source'].get('sha256'))[:12]}…, this one {str(loaded.source.get('sha256'))[:12]}…)"
        )
    if "factors_fingerprint" not in metadata:
        raise EdgeAsrError(
            f"{Path(delta).name} records no factors' fingerprint: rebuild the delta with `edge-asr recover`"
        )
    recipe = metadata["recipe"]
    calibration = calibration or calibrate(
        loaded, CalibrationMix(**recipe["calibration"]), step, tuple(recipe["parts"])
    )
    step("activation-aware factors")
    model = factored(loaded, metadata["structure"], calibration)
    distance = fingerprint_distance(factors_fingerprint(model), metadata["factors_fingerprint"])
    if not distance <= FACTORS_TOLERANCE:
        raise EdgeAsrError(
            f"{Path(delta).name} was trained on other factors (the rebuilt ones differ by "
            f"{distance:.1e}, more than {FACTORS_TOLERANCE:.0e}): rebuild the delta with `edge-asr recover`"
        )
    step(f"apply the recovered delta {Path(delta).name}")
    apply_delta(model, Path(delta))
    model.compression = metadata["structure"]
    summary = {
        "delta": Path(delta).name,
        "sha256": sha256_file(Path(delta)),
        "kind": "compact-lora",
        "factors_distance": float(f"{distance:.2e}"),
        "parameters": {"before": metadata["params_before"], "after": metadata["params_after"]},
        "held_out_loss": {
            "before": metadata["result"]["held_out_before"],
            "after": metadata["result"]["held_out_best"],
        },
    }
    return model, summary


def recover_compact(run: RecipeRun, recipe: CompactRecipe | None = None, structure: dict | None = None) -> dict:
    """Run the whole recipe on `run.source` and write the compact delta `run.out` (safetensors, a JSON summary
    beside it). `structure` skips the rank measurements (for example the ranks of a shipped delta)."""
    recipe = recipe or CompactRecipe()
    match = run.match(recipe.match)
    torch.manual_seed(match.seed)
    started = time.time()
    run.step(f"load {run.source}")
    loaded = load_whisper(run.source)
    calibration = calibrate(loaded, recipe.calibration, run.step, recipe.parts)
    if structure is None:
        run.step("measure each matrix's distortion at each candidate rank")
        structure, report = measure_structure(
            loaded, recipe, calibration, progress=lambda jobs, desc: tqdm(jobs, desc=desc, unit="cut")
        )
        run.log(report.table())
    student = factored(loaded, structure, calibration)
    fingerprint, params_after = factors_fingerprint(student), student.parameter_count()
    # The adapt pass's reference sets, shared: the same mixes make the same cache key.
    work, train, held_out = run.reference_sets(loaded, recipe.mix, recipe.held_out, match.seed)
    prepared = time.time() - started
    run.step(f"recover by reference matching ({match.steps} steps)")
    # named by what makes the factors (not by their last bits, which are this machine's)
    tag = items_key(loaded.source.get("sha256"), json.dumps(structure, sort_keys=True), recipe.to_dict())
    trainable = trainable_parameters(student, match)
    # The factored embedding's projection changes the logits and no hidden state: with the output term on,
    # its shared right factor (n_state x rank) trains too and ships whole in the delta.
    whole = ["decoder.token_embedding.tail_proj"] if match.output_weight and structure.get("embedding") else []
    for name in whole:
        trainable.append(student.get_parameter(name).requires_grad_(True))
    projection = loaded.model.decoder.token_embedding.weight
    if match.steps:
        result = match_reference(
            student,
            train,
            match,
            held_out=held_out,
            trainable=trainable,
            checkpoint=run.checkpoint(work / f"checkpoint-compact-{tag}.pt"),
            reference_projection=projection,
            log=run.log,
        )
    else:  # factors only: the delta carries the ranks and the factors' digest, its adapters are zero
        loss = round(
            held_out_loss(
                student,
                held_out,
                lambda frames, rng: N_FRAMES,
                torch.device("cpu"),
                reference_projection=projection,
                output_weight=match.output_weight,
            ),
            5,
        )
        result = MatchResult(0, 0.0, "cpu", 0, loss, loss, 0, [{"step": 0, "train_loss": None, "held_out_loss": loss}])
    metadata = recipe_metadata(
        "compact-lora",
        loaded,
        match,
        replace(recipe, match=match).to_dict(),
        run,
        {"train": len(train), "held_out": len(held_out)},
        result,
        prepared,
        structure=structure,
        factors_fingerprint=fingerprint,
        params_before=loaded.model.parameter_count(),
        params_after=params_after,
    )
    write_delta(student, run.out, metadata, readable_metadata(metadata), whole)
    return metadata


def readable_metadata(metadata: dict) -> dict:
    """What the JSON beside a compact delta shows: its metadata with the fingerprint's numbers left in the
    delta's header."""
    fingerprint = metadata["factors_fingerprint"]
    k = fingerprint["probes"]
    return metadata | {
        "factors_fingerprint": f"{len(fingerprint['tensors'])} tensors, {k}x{k} probes each (in the delta's header)"
    }
