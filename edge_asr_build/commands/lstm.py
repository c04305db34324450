"""The build step's `lstm` commands: train, convert, compress and build streaming LSTM-CTC models."""

from __future__ import annotations

import sys
from pathlib import Path

from edge_asr.errors import EdgeAsrError
from edge_asr.paths import bundle_dir
from edge_asr_build.commands.progress import StepProgress
from edge_asr_build.commands.whisper import parse_format_list, recipe_run
from edge_asr_build.lstm import cald_train
from edge_asr_build.lstm import recipe as lstm_recipe
from edge_asr_build.lstm.bundle import build_lstm_bundle
from edge_asr_build.lstm.cald import is_cald_checkpoint
from edge_asr_build.lstm.model import is_lstm_checkpoint
from edge_asr_build.sources import SourceError, check_source


def cmd_lstm_train(args) -> int:
    hidden = [int(h) for h in args.hidden.split(",")]
    config = lstm_recipe.LstmRecipe(
        utterances=args.utterances,
        copies=args.copies,
        hidden=hidden,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        sentence_share=args.sentence_share,
    )
    for folder in args.audio or []:
        if not Path(folder).is_dir():
            raise EdgeAsrError(f"{folder}: not a folder of audio")
    init = _lstm_checkpoint(args.init) if args.init else None
    path = lstm_recipe.train_lstm(
        Path(args.out),
        config,
        [Path(a) for a in args.audio or []],
        args.teacher,
        args.threads,
        init,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(path)
    return 0


def _lstm_checkpoint(path: str) -> Path:
    if not (is_lstm_checkpoint(path) or is_cald_checkpoint(path)):
        raise EdgeAsrError(
            f"{path}: not an LSTM-CTC checkpoint (expected the .json or .safetensors written by "
            "`edge-asr lstm train` or `edge-asr lstm convert`)"
        )
    return Path(path).with_suffix(".safetensors")


def cmd_lstm_convert(args) -> int:
    recipe = cald_train.CaldRecipe(
        layerwise_steps=args.layerwise_steps,
        joint_steps=args.joint_steps,
        head_steps=args.head_steps,
        ctc_steps=args.ctc_steps,
        seed=args.seed,
    )
    progress = StepProgress(6, "convert")
    try:
        run = recipe_run(args, progress, steps=None)
        check_source(args.source)
        path = cald_train.convert(run, recipe, args.threads)
    except (SourceError, ValueError, FileNotFoundError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    print(path)
    return 0


def cmd_lstm_compress(args) -> int:
    source = _lstm_checkpoint(args.source)
    if not 0 < args.ratio < 1:
        raise EdgeAsrError("--ratio must be between 0 and 1")
    if is_cald_checkpoint(source):
        progress = StepProgress(3, "compress")
        try:
            run = recipe_run(args, progress, source=str(source))
            path = cald_train.compress_and_recover(run, args.ratio, threads=args.threads)
        except (ValueError, FileNotFoundError) as e:
            raise EdgeAsrError(str(e)) from None
        finally:
            progress.close()
        print(path)
        return 0
    path = lstm_recipe.compress_and_recover(
        source,
        Path(args.out),
        args.ratio,
        args.epochs,
        args.lr,
        args.kd_weight,
        threads=args.threads,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(path)
    return 0


def cmd_lstm_build(args) -> int:
    source = _lstm_checkpoint(args.source)
    out = Path(args.out) if args.out else bundle_dir(f"{source.stem}-{args.precision}")
    formats = parse_format_list(args.formats)
    progress = StepProgress(2 + (args.precision == "int8") + args.eval + len(formats) - 1, f"build {out.name}")
    try:
        manifest = build_lstm_bundle(
            source, out, args.precision, out.name, args.eval, args.threads, step=progress, formats=formats
        )
    finally:
        progress.close()
    size = sum(f.bytes for f in manifest.files.values()) / 1e6
    held_out = manifest.evaluation.get("held_out_synthetic")
    print(
        f"built {out} ({size:.2f} MB, {manifest.model.parameters / 1e6:.2f} M params"
        + (f", held-out synthesized WER {held_out['wer']:.2f}%" if held_out else "")
        + ")"
    )
    return 0
