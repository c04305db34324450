"""The build step's commands for Whisper models: build, adapt, compress, recover, prune, synth.

Each turns its arguments into one call of the build step and prints a one-line summary; every failure a user
can cause ends in an `EdgeAsrError` (one line on stderr, a non-zero exit).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from edge_asr.bundle import Bundle, sha256_file
from edge_asr.context import ContextPolicy
from edge_asr.errors import EdgeAsrError
from edge_asr.paths import bundle_dir
from edge_asr_build.bundle import pipeline
from edge_asr_build.bundle.formats import parse_formats
from edge_asr_build.commands.progress import StepProgress
from edge_asr_build.matching.engine import MatchConfig
from edge_asr_build.matching.lora import delta_metadata
from edge_asr_build.recipes.adapt import DEFAULT_DELTA, ContextRecipe, adapt_context
from edge_asr_build.recipes.compact import DEFAULT_COMPACT_DELTA, CompactRecipe, recover_compact
from edge_asr_build.recipes.prune import PrunedRecipe, recover_pruned
from edge_asr_build.recipes.run import RecipeRun
from edge_asr_build.sources import SourceError, check_source
from edge_asr_build.speech.synth import synthetic_set


def build_bundle(
    source: str,
    precision: str,
    out: Path,
    tokenizer: str | None,
    evaluate_on: int,
    threads: int,
    compact: bool = False,
    formats: str = "onnx",
    context: str = "full",
    delta: str | None = None,
    compact_delta: str | None = None,
) -> dict:
    """Run the build step with progress on stderr and a one-line summary; returns the manifest.

    With `compact`, the compact model of the shipped recovered delta (or `compact_delta`) is built: factors
    rebuilt from calibration audio, checked, adapters merged. A `context` other than "full" merges the
    dynamic-context `delta` (default: the one shipped for tiny.en) first."""
    started = time.perf_counter()
    try:
        policy = ContextPolicy.parse(context)
        delta_path = _context_delta(source, policy, delta)
        compact_path = _compact_delta(source, compact_delta) if compact else None
        check_source(source)
        formats = parse_format_list(formats)
        progress = StepProgress(
            5
            + (precision != "fp32")
            + bool(evaluate_on)
            + len(formats)
            - 1
            + bool(delta_path)
            + 5 * bool(compact_path),
            f"build {Path(source).name}",
        )
        try:
            manifest = pipeline.build_whisper_bundle(
                source,
                out,
                precision,
                name=out.name,
                tokenizer=tokenizer,
                evaluate_on=evaluate_on,
                threads=threads,
                step=progress,
                formats=formats,
                context=policy,
                delta=delta_path,
                compact_delta=compact_path,
            )
        finally:
            progress.close()
    except (SourceError, ValueError, FileNotFoundError) as e:
        raise EdgeAsrError(str(e)) from None
    size = sum(f.bytes for f in manifest.files.values()) / 1e6
    line = f"built {out} ({size:.1f} MB, {manifest.model.parameters / 1e6:.1f} M params"
    if "synthetic" in manifest.evaluation:
        ev = manifest.evaluation["synthetic"]
        line += f", synthetic WER {ev['wer']:.2f}% on {ev['words']} words, RTF {ev['rtf_wall']:.3f}"
    print(line + f") in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return manifest


def _delta_file(delta: str | None, source: str, shipped: Path, missing: str) -> Path:
    """`delta` if given (it must exist), else the delta `shipped` for tiny.en; for another source without one,
    the error `missing`."""
    if delta:
        if not Path(delta).is_file():
            raise EdgeAsrError(f"{delta}: no such delta file")
        return Path(delta)
    if source != "tiny.en":
        raise EdgeAsrError(missing)
    return shipped


def _compact_delta(source: str, delta: str | None) -> Path:
    """The recovered delta `--compact` builds from: `delta`, or the one shipped for tiny.en."""
    return _delta_file(
        delta,
        source,
        DEFAULT_COMPACT_DELTA,
        f"--compact needs a compact delta for {source}: make one with "
        f"`edge-asr recover --source {source} --out DELTA` and pass it with --compact-delta",
    )


def _context_delta(source: str, policy: ContextPolicy, delta: str | None) -> Path | None:
    """The adapted delta a context policy needs: none for "full", else `delta` or the one shipped for tiny.en."""
    if policy.mode == "full":
        if delta:
            raise EdgeAsrError("--delta adapts a model to short context: use it with --context auto or SECONDS")
        return None
    return _delta_file(
        delta,
        source,
        DEFAULT_DELTA,
        f"--context {policy.mode} needs a model adapted to short context: train a delta for "
        f"{source} with `edge-asr adapt --source {source}` and pass it with --delta",
    )


def default_bundle_name(
    source: str,
    precision: str,
    compact: bool = False,
    context: str = "full",
    delta: str | None = None,
    compact_delta: str | None = None,
) -> str:
    """A bundle's folder name, which says what it holds: source, compression, context policy (with a hash of
    the adapted delta's sha256 and the policy's numbers, so that a bundle of another recipe is never taken
    for it), precision."""
    name = Path(source).stem if source.endswith(".json") else Path(source).name
    if compact:
        name += f"-compact-{sha256_file(_compact_delta(source, compact_delta))[:8]}"
    policy = ContextPolicy.parse(context)
    if policy.mode != "full":
        delta_path = _context_delta(source, policy, delta)
        recipe = sha256_file(delta_path) + json.dumps(policy.to_dict(), sort_keys=True)
        tag = "auto" if policy.mode == "auto" else f"ctx{policy.floor_s:g}"
        name += f"-{tag}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    return f"{name}-{precision}"


def parse_format_list(text: str) -> list[str]:
    """`--formats`: the model formats a bundle is to carry."""
    try:
        return parse_formats(text)
    except ValueError as e:
        raise EdgeAsrError(str(e)) from None


def has_formats(bundle: Path, formats: str) -> bool:
    """Whether a built bundle already carries every format asked for (if not, it is rebuilt with them)."""
    try:
        have = Bundle.load(bundle, verify=False).formats
    except EdgeAsrError:
        return False
    return all(f.strip() in have for f in formats.split(",") if f.strip())


def default_context(source: str, compact: bool, delta: str | None) -> str:
    """`build`'s context policy when none is asked for: the adapted dynamic context where there is a delta
    for it (given, or shipped: tiny.en's), else Whisper's 30 s (other sources, and the compact model)."""
    return "auto" if not compact and (delta or source == "tiny.en") else "full"


def cmd_build(args) -> int:
    args.context = args.context or default_context(args.source, args.compact, args.delta)
    try:
        name = default_bundle_name(
            args.source, args.precision, args.compact, args.context, args.delta, args.compact_delta
        )
    except ValueError as e:
        raise EdgeAsrError(str(e)) from None
    out = Path(args.out) if args.out else bundle_dir(name)
    if (out / "manifest.json").exists() and not args.force and has_formats(out, args.formats):
        print(f"{out}: already built (use --force to rebuild)", file=sys.stderr)
    else:
        build_bundle(
            args.source,
            args.precision,
            out,
            args.tokenizer,
            args.eval,
            args.threads,
            compact=args.compact,
            formats=args.formats,
            context=args.context,
            delta=args.delta,
            compact_delta=args.compact_delta,
        )
    print(out)
    return 0


def recipe_run(args, step: StepProgress, **extra) -> RecipeRun:
    """The run description of a recipe command's arguments (source, out, --corpus, --audio, --work,
    --resume, --steps); the folders must exist."""
    given = {
        "source": args.source,
        "out": Path(args.out),
        "corpora": tuple(existing_folders(args.corpus)),
        "user_audio": tuple(existing_folders(args.audio)),
        "work": Path(args.work) if args.work else None,
        "resume": args.resume,
        "steps": getattr(args, "steps", None),
        "step": step,
        "log": lambda message: print(message, file=sys.stderr, flush=True),
    }
    return RecipeRun(**(given | extra))


def _seeded(match: MatchConfig, args) -> MatchConfig:
    return replace(match, seed=args.seed, device=args.device)


def cmd_adapt(args) -> int:
    recipe = ContextRecipe()
    recipe = replace(recipe, match=_seeded(recipe.match, args))
    progress = StepProgress(7, "adapt")
    try:
        run = recipe_run(args, progress)  # missing folders first: a one-line error before any work
        check_source(args.source)
        metadata = adapt_context(run, recipe)
    except (SourceError, ValueError, FileNotFoundError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    r = metadata["result"]
    print(
        f"adapted in {sum(metadata['seconds'].values()):.0f} s "
        f"({metadata['clips']['train']} clips, {r['steps']} steps): "
        f"held-out loss {r['held_out_before']} -> {r['held_out_best']} (step {r['best_step']})",
        file=sys.stderr,
    )
    print(args.out)
    return 0


def cmd_compress(args) -> int:
    parts = tuple(p.strip() for p in args.parts.split(",")) if args.parts else pipeline.DEFAULT_PARTS
    progress = StepProgress(3 + 3 * (args.factors == "activation" or args.ranks == "measured"), "compress")
    try:
        check_source(args.source)
        if args.ranks == "measured" and args.keep is None:
            raise ValueError("--ranks measured needs --keep")
        path, report = pipeline.compress_checkpoint(
            args.source,
            Path(args.out),
            keep=args.keep,
            energy=args.energy,
            parts=parts,
            attention=args.attention,
            frequent_tokens=args.frequent_tokens,
            calibrate=args.factors == "activation",
            measured=args.ranks == "measured",
            step=progress,
        )
    except (SourceError, ValueError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    print(path, file=sys.stderr)
    return 0


def cmd_recover(args) -> int:
    recipe = CompactRecipe()
    recipe = replace(recipe, match=_seeded(recipe.match, args), keep=args.keep or recipe.keep)
    progress = StepProgress(9, "recover")
    try:
        run = recipe_run(args, progress)
        check_source(args.source)
        if args.ranks_from and not Path(args.ranks_from).is_file():
            raise EdgeAsrError(f"{args.ranks_from}: no such delta file")
        structure = delta_metadata(Path(args.ranks_from))["structure"] if args.ranks_from else None
        metadata = recover_compact(run, recipe, structure)
    except (SourceError, ValueError, FileNotFoundError, KeyError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    r = metadata["result"]
    print(
        f"recovered in {sum(metadata['seconds'].values()):.0f} s ({metadata['params_after'] / 1e6:.1f} M params, "
        f"{r['steps']} steps): held-out loss {r['held_out_before']} -> {r['held_out_best']} (step {r['best_step']})",
        file=sys.stderr,
    )
    print(args.out)
    return 0


def cmd_prune(args) -> int:
    recipe = PrunedRecipe()
    recipe = replace(
        recipe,
        match=_seeded(recipe.match, args),
        decoder_layers=args.decoder_layers,
        train_clips=args.train_clips or recipe.train_clips,
    )
    progress = StepProgress(13, "prune")
    try:
        run = recipe_run(args, progress)
        check_source(args.source)
        metadata = recover_pruned(run, recipe)
    except (SourceError, ValueError, FileNotFoundError, KeyError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    wer = metadata["held_out_wer"]
    after = f", recovered {wer['recovered']['wer']}%" if "recovered" in wer else ""
    print(
        f"pruned to {len(metadata['pruned']['decoder'])} decoder blocks "
        f"({metadata['params_after'] / 1e6:.1f} M params) "
        f"in {sum(metadata['seconds'].values()):.0f} s: held-out WER unchanged {wer['reference']['wer']}%, "
        f"pruned {wer['pruned']['wer']}%{after}",
        file=sys.stderr,
    )
    print(args.out)
    return 0


def existing_folders(paths: list[str] | None) -> list[Path]:
    """Folders named on the command line (`--corpus`, `--audio`); a missing one is an error."""
    for folder in paths or []:
        if not Path(folder).is_dir():
            raise EdgeAsrError(f"{folder}: no such folder")
    return [Path(p) for p in paths or []]


def cmd_synth(args) -> int:
    print(synthetic_set(args.count, seed=args.seed, voice=args.voice, folder=Path(args.out)))
    return 0
