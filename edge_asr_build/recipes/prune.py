"""Pruned Whisper on dynamic context: whole decoder blocks removed by measured importance, the rest adapted.

The recipe, in the order of the build step's passes:

  1. calibrate  the compact recipe's calibration clips and the reference's transcripts of them.
  2. measure    every block's importance (`layers.layer_importance`: how far it turns the residual stream, and
                the output KL with it alone removed); the decoder blocks to remove chosen greedily by KL
                (`layers.prune_plan`). The decoder runs once per token, so its depth is what pruning buys.
  3. prune      those blocks removed (`layers.prune`).
  4. recover    LoRA adapters on every linear layer that is left, trained by reference matching: the
                reference is the unchanged model on its 30 s window, the student the pruned model on the
                audio's own length (the adapt pass's windows, `recipes.adapt.training_frames`), each of its
                decoder blocks matched to the original block it is. One run recovers from the pruning and
                adapts to the short window; the held-out loss selects the state kept.

Held-out WER (greedy, in torch, on the adapt pass's held-out sets: unseen voices, sentences and speakers)
is measured for the unchanged model, the pruned model before recovery (30 s windows, as it was trained)
and after (its own windows), and kept in the delta with the importance table and the plan.
`pruned_model` rebuilds 3 from the delta and merges 4: what `build --context auto --delta PRUNED` does in seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from edge_asr.bundle import sha256_file
from edge_asr.context import ContextPolicy
from edge_asr.errors import EdgeAsrError
from edge_asr.frontend import N_FRAMES
from edge_asr.metrics import normalize, word_error_rate
from edge_asr_build.compression.calibration import CalibrationMix, Distortion
from edge_asr_build.compression.layers import importance_table, layer_importance, prune, prune_plan
from edge_asr_build.matching.data import greedy, load_clip_mels, padded
from edge_asr_build.matching.engine import MatchConfig, MatchResult, match_reference, trainable_parameters
from edge_asr_build.matching.lora import apply_delta, delta_metadata
from edge_asr_build.recipes.adapt import ContextRecipe, held_out_frames, training_frames
from edge_asr_build.recipes.compact import calibrate
from edge_asr_build.recipes.run import RecipeRun, recipe_metadata, write_delta
from edge_asr_build.sources import load_whisper
from edge_asr_build.speech.training_audio import AudioMix, HeldOutMix
from edge_asr_build.whisper.vocabulary import decoding_rules


@dataclass(frozen=True)
class PrunedRecipe:
    decoder_layers: int = 4  # decoder blocks kept
    calibration: CalibrationMix = field(default_factory=CalibrationMix)
    measure_clips: int = 24  # calibration clips the importance is measured on
    mix: AudioMix = field(default_factory=AudioMix)
    held_out: HeldOutMix = field(default_factory=HeldOutMix)
    # The reference transcribes a seeded subset of the mix (base costs 0.8 s a clip on 2 cores).
    train_clips: int = 700
    context: ContextRecipe = field(default_factory=ContextRecipe)
    # Sized for 2 CPU cores: reference states about 15 min, training about 25 min for base.
    match: MatchConfig = field(
        default_factory=lambda: MatchConfig(
            steps=300,
            batch_size=8,
            learning_rate=2e-4,
            warmup_steps=30,
            lora_rank=32,
            lora_alpha=32.0,
            parts=("encoder", "decoder"),
            checkpoint_every=25,
            eval_every=50,
        )
    )
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_wer(
    model, loaded, mels: list, texts: list[str | None], frames: Callable[[int], int], progress=None
) -> dict:
    """Greedy WER of `model` on the held-out clips that have texts, each on a window of `frames(clip frames)`,
    by the runtime decoder's rules; {"wer", "words", "clips"}."""

    decoding = decoding_rules(loaded)
    tokenizer = Tokenizer.from_file(str(loaded.tokenizer_json))
    pairs = [(m, t) for m, t in zip(mels, texts) if t]
    references, hypotheses = [], []
    model.eval()
    with torch.inference_mode():
        for mel, text in progress(pairs, "held-out WER") if progress else pairs:
            cross = model.decoder.cross_kv(model.encoder(padded(mel, frames(mel.shape[-1]))[None]))
            tokens = greedy(model, cross, list(decoding["prompt"]), decoding, timestamps=False) or []
            hypotheses.append(tokenizer.decode([t for t in tokens if t < decoding["special_tokens"]["eot"]]))
            references.append(text)
    words = sum(len(normalize(r).split()) for r in references)
    return {"wer": round(word_error_rate(references, hypotheses), 2), "words": words, "clips": len(pairs)}


def measure_importance(
    loaded, recipe: PrunedRecipe, step: Callable[[str], None] = lambda m: None, progress=None, log=print
) -> tuple[list, list[dict]]:
    """(importance rows of every block, the decoder plan down to `recipe.decoder_layers`)."""

    calibration = calibrate(loaded, recipe.calibration, step, parts=())
    distortion = Distortion.of_reference(loaded.model, calibration.items[: recipe.measure_clips])
    step("measure every block's importance")
    rows = layer_importance(loaded.model, distortion, progress)
    log(importance_table(rows))
    remove = loaded.model.dims.n_text_layer - recipe.decoder_layers
    step(f"choose {remove} decoder blocks to remove")
    plan = prune_plan(loaded.model, distortion, "decoder", remove, log=log)
    return rows, plan


def recover_pruned(run: RecipeRun, recipe: PrunedRecipe | None = None) -> dict:
    """Run the whole recipe on `run.source`; writes the delta `run.out` (safetensors, a JSON summary beside it)."""
    recipe = recipe or PrunedRecipe()
    match = run.match(recipe.match)
    torch.manual_seed(match.seed)
    started = time.time()
    run.step(f"load {run.source}")
    loaded = load_whisper(run.source)
    progress = lambda jobs, desc: tqdm(jobs, desc=desc, unit="clip")  # noqa: E731
    blocks = lambda jobs, desc: tqdm(jobs, desc=desc, unit="block")  # noqa: E731
    rows, plan = measure_importance(loaded, recipe, run.step, blocks, run.log)
    student = prune(loaded.model, {"decoder": [p["index"] for p in plan]})
    params_after = student.parameter_count()  # before adapters are added
    work, train, held_out = run.reference_sets(
        loaded, recipe.mix, recipe.held_out, match.seed, train_limit=recipe.train_clips
    )
    audio = run.clips(recipe.mix, recipe.held_out, match.seed)
    mels, texts = load_clip_mels(audio / "held-out-mels.safetensors")
    policy = ContextPolicy.auto()
    own = lambda frames: policy.frames(frames * 160)  # noqa: E731
    full = lambda frames: N_FRAMES  # noqa: E731
    wer, plan_key = measured_wer(work, loaded, student, plan, mels, texts, full, progress, run.step)
    run.log(
        f"held-out WER: unchanged {wer['reference']['wer']}%, pruned to {recipe.decoder_layers} decoder blocks "
        f"{wer['pruned']['wer']}% (30 s windows)"
    )
    prepared = time.time() - started
    run.step(f"recover and adapt by reference matching ({match.steps} steps)")
    if match.steps:
        result = match_reference(
            student,
            train,
            match,
            training_frames(recipe.context),
            held_out,
            held_out_frames(policy),
            # a resumed run must have pruned the same blocks
            checkpoint=run.checkpoint(work / f"checkpoint-{plan_key}.pt"),
            log=run.log,
        )
        run.step("held-out WER after recovery (the audio's own windows)")
        wer["recovered"] = held_out_wer(student, loaded, mels, texts, own, progress)
        run.log(f"held-out WER after recovery: {wer['recovered']['wer']}%")
    else:  # measurement only: the plan and the WER before recovery; the delta's adapters are zero
        trainable_parameters(student, match)
        result = MatchResult(0, 0.0, "cpu", 0, None, None, 0)
    metadata = recipe_metadata(
        "pruned-context-lora",
        loaded,
        match,
        replace(recipe, match=match).to_dict(),
        run,
        {"train": len(train), "held_out": len(held_out)},
        result,
        prepared,
        pruned=student.pruned,
        plan=plan,
        importance=[r.to_dict() for r in rows],
        params_before=loaded.model.parameter_count(),
        params_after=params_after,
        held_out_policy=policy.to_dict(),
        held_out_wer=wer,
    )
    write_delta(student, run.out, metadata)
    return metadata


def measured_wer(
    work: Path, loaded, student, plan: list[dict], mels, texts, frames, progress, step
) -> tuple[dict, str]:
    """Held-out WER (30 s windows) of the unchanged model and of the pruned one before recovery, measured once
    per model and pruning plan and kept beside the reference states; and the plan's key."""
    path = work / "held-out-wer.json"
    measured = json.loads(path.read_text()) if path.exists() else {}
    plan_key = "pruned-" + "-".join(str(p["index"]) for p in plan)
    if "reference" not in measured:
        step("held-out WER of the unchanged model (30 s windows)")
        measured["reference"] = held_out_wer(loaded.model, loaded, mels, texts, frames, progress)
    if plan_key not in measured:
        step("held-out WER of the pruned model before recovery (30 s windows)")
        measured[plan_key] = held_out_wer(student, loaded, mels, texts, frames, progress)
    path.write_text(json.dumps(measured, indent=1))
    return {"reference": measured["reference"], "pruned": measured[plan_key]}, plan_key


def pruned_model(loaded, delta: Path) -> tuple[object, dict]:
    """The model of a pruned delta: its blocks removed, its adapters merged. Returns (model, manifest summary)."""

    metadata = delta_metadata(Path(delta))
    if metadata.get("kind") != "pruned-context-lora":
        raise EdgeAsrError(f"{delta} is not a pruned delta (kind {metadata.get('kind')!r})")
    if metadata["source"].get("sha256") != loaded.source.get("sha256"):
        raise EdgeAsrError(
            f"{Path(delta).name} was trained on another model (sha256 {str(metadata['source'].get('sha256'))[:12]}…)"
        )
    pruned = metadata["pruned"]
    n_text = loaded.model.dims.n_text_layer
    model = prune(loaded.model, {"decoder": [i for i in range(n_text) if i not in pruned["decoder"]]})
    apply_delta(model, Path(delta))
    summary = {
        "delta": Path(delta).name,
        "sha256": sha256_file(Path(delta)),
        "kind": metadata["kind"],
        "rank": metadata["rank"],
        "pruned": pruned,
        "parameters": {"before": metadata["params_before"], "after": metadata["params_after"]},
        "held_out_wer": metadata.get("held_out_wer"),
        "held_out_loss": {
            "before": metadata["result"]["held_out_before"],
            "after": metadata["result"]["held_out_best"],
        },
    }
    return model, summary
