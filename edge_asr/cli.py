"""The `edge-asr` command line: build, adapt, compress, recover, lstm (train, compress, build), transcribe,
listen, daemon, collect, devices, bench, synth, info, demo.

Every failure a user can cause (bad audio, missing or modified bundle, unknown model source) ends in
one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .backend import BACKENDS
from .commands import DEFAULT_REJECTION_THRESHOLD
from .context import ContextPolicy
from .errors import EdgeAsrError
from .paths import DEFAULT_BUNDLE, bundle_dir
from .threads import resolve_threads
from .writers import WRITERS

DEMO_SENTENCE = "Replace the hydraulic filter on press number four before the night shift."
DEMO_FORMATS = "onnx,tflite"  # the demo shows both backends
DEMO_STREAM = [
    "The coolant pump on line two is running hot.",
    "Order a new drive belt for the north conveyor.",
    "Mark the inspection as done.",
]


def _build_side():
    """The build step needs torch and friends, which a device install does not have."""
    try:
        import edge_asr_build.pipeline as pipeline
    except ImportError as e:
        raise EdgeAsrError(
            f"this command needs the build step's dependencies ({e.name} is missing): pip install 'edge-asr[build]'"
        ) from None
    return pipeline


class StepProgress:
    """Progress of a multi-step job: a bar on a terminal, one line per step in logs."""

    def __init__(self, total: int, desc: str):
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def __call__(self, message: str) -> None:
        if self.bar is None:
            print(f"  {message}", file=sys.stderr, flush=True)
            return
        if self.bar.postfix:  # the previous step is done
            self.bar.update(1)
        self.bar.set_postfix_str(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    pipeline = _build_side()
    from edge_asr_build import loaders

    started = time.perf_counter()
    try:
        policy = ContextPolicy.parse(context)
        delta_path = _context_delta(source, policy, delta)
        compact_path = _compact_delta(source, compact_delta) if compact else None
        loaders.check_source(source)
        formats = _formats(formats)
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
    except (loaders.SourceError, ValueError, FileNotFoundError) as e:
        raise EdgeAsrError(str(e)) from None
    size = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    line = f"built {out} ({size:.1f} MB, {manifest['model']['parameters'] / 1e6:.1f} M params"
    if "synthetic" in manifest["evaluation"]:
        ev = manifest["evaluation"]["synthetic"]
        line += f", synthetic WER {ev['wer']:.2f}% on {ev['words']} words, RTF {ev['rtf_wall']:.3f}"
    print(line + f") in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return manifest


def _delta_file(delta: str | None, source: str, shipped: Callable[[], Path], missing: str) -> Path:
    """`delta` if given (it must exist), else the delta shipped for tiny.en (`shipped()`); for another
    source without one, the error `missing`."""
    if delta:
        if not Path(delta).is_file():
            raise EdgeAsrError(f"{delta}: no such delta file")
        return Path(delta)
    if source != "tiny.en":
        raise EdgeAsrError(missing)
    return shipped()


def _compact_delta(source: str, delta: str | None) -> Path:
    """The recovered delta `--compact` builds from: `delta`, or the one shipped for tiny.en."""

    def shipped() -> Path:
        from edge_asr_build.compact import DEFAULT_COMPACT_DELTA

        return DEFAULT_COMPACT_DELTA

    return _delta_file(
        delta,
        source,
        shipped,
        f"--compact needs a compact delta for {source}: make one with "
        f"`edge-asr recover --source {source} --out DELTA` and pass it with --compact-delta",
    )


def _context_delta(source: str, policy: ContextPolicy, delta: str | None) -> Path | None:
    """The adapted delta a context policy needs: none for "full", else `delta` or the one shipped for tiny.en."""
    if policy.mode == "full":
        if delta:
            raise EdgeAsrError("--delta adapts a model to short context: use it with --context auto or SECONDS")
        return None

    def shipped() -> Path:
        from edge_asr_build.context_adapt import DEFAULT_DELTA

        return DEFAULT_DELTA

    return _delta_file(
        delta,
        source,
        shipped,
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
    import hashlib

    name = Path(source).stem if source.endswith(".json") else Path(source).name
    if compact:
        from .bundle import sha256_file

        name += f"-compact-{sha256_file(_compact_delta(source, compact_delta))[:8]}"
    policy = ContextPolicy.parse(context)
    if policy.mode != "full":
        from .bundle import sha256_file

        delta_path = _context_delta(source, policy, delta)
        recipe = sha256_file(delta_path) + json.dumps(policy.to_dict(), sort_keys=True)
        tag = "auto" if policy.mode == "auto" else f"ctx{policy.floor_s:g}"
        name += f"-{tag}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    return f"{name}-{precision}"


def _formats(text: str) -> list[str]:
    from edge_asr_build.formats import parse_formats

    try:
        return parse_formats(text)
    except ValueError as e:
        raise EdgeAsrError(str(e)) from None


def _has_formats(bundle: Path, formats: str) -> bool:
    """Whether a built bundle already carries every format asked for (if not, it is rebuilt with them)."""
    from .bundle import Bundle

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
    _build_side()
    args.context = args.context or default_context(args.source, args.compact, args.delta)
    try:
        name = default_bundle_name(
            args.source, args.precision, args.compact, args.context, args.delta, args.compact_delta
        )
    except ValueError as e:
        raise EdgeAsrError(str(e)) from None
    out = Path(args.out) if args.out else bundle_dir(name)
    if (out / "manifest.json").exists() and not args.force and _has_formats(out, args.formats):
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


def cmd_adapt(args) -> int:
    from dataclasses import replace

    _build_side()
    from edge_asr_build import loaders
    from edge_asr_build.context_adapt import ContextRecipe, adapt_context

    recipe = ContextRecipe()
    recipe = replace(
        recipe, match=replace(recipe.match, steps=args.steps or recipe.match.steps, seed=args.seed, device=args.device)
    )
    corpora, audio = _folders(args.corpus), _folders(args.audio)
    progress = StepProgress(7, "adapt")
    try:
        loaders.check_source(args.source)
        metadata = adapt_context(
            args.source,
            Path(args.out),
            corpora,
            audio,
            recipe,
            work=Path(args.work) if args.work else None,
            resume=args.resume,
            step=progress,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (loaders.SourceError, ValueError, FileNotFoundError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    r = metadata["result"]
    print(
        f"adapted in {sum(metadata['seconds'].values()):.0f} s ({metadata['clips']['train']} clips, {r['steps']} steps): "
        f"held-out loss {r['held_out_before']} -> {r['held_out_best']} (step {r['best_step']})",
        file=sys.stderr,
    )
    print(args.out)
    return 0


def cmd_compress(args) -> int:
    pipeline = _build_side()
    from edge_asr_build import loaders

    parts = tuple(p.strip() for p in args.parts.split(",")) if args.parts else pipeline.DEFAULT_PARTS
    progress = StepProgress(3 + 3 * (args.factors == "activation" or args.ranks == "measured"), "compress")
    try:
        loaders.check_source(args.source)
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
    except (loaders.SourceError, ValueError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    print(path, file=sys.stderr)
    return 0


def cmd_recover(args) -> int:
    _build_side()
    from dataclasses import replace

    from edge_asr_build import loaders
    from edge_asr_build.compact import CompactRecipe, recover_compact
    from edge_asr_build.lora import delta_metadata

    recipe = CompactRecipe()
    match = replace(recipe.match, seed=args.seed, device=args.device, steps=args.steps or recipe.match.steps)
    recipe = replace(recipe, match=match, keep=args.keep or recipe.keep)
    progress = StepProgress(9, "recover")
    try:
        loaders.check_source(args.source)
        if args.ranks_from and not Path(args.ranks_from).is_file():
            raise EdgeAsrError(f"{args.ranks_from}: no such delta file")
        structure = delta_metadata(Path(args.ranks_from))["structure"] if args.ranks_from else None
        metadata = recover_compact(
            args.source,
            Path(args.out),
            _folders(args.corpus),
            _folders(args.audio),
            recipe,
            Path(args.work) if args.work else None,
            args.resume,
            structure,
            step=progress,
            log=lambda message: print(message, file=sys.stderr),
        )
    except (loaders.SourceError, ValueError, FileNotFoundError, KeyError) as e:
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
    _build_side()
    from dataclasses import replace

    from edge_asr_build import loaders
    from edge_asr_build.pruned import PrunedRecipe, recover_pruned

    recipe = PrunedRecipe()
    match = replace(
        recipe.match, seed=args.seed, device=args.device, steps=recipe.match.steps if args.steps is None else args.steps
    )
    recipe = replace(
        recipe, match=match, decoder_layers=args.decoder_layers, train_clips=args.train_clips or recipe.train_clips
    )
    corpora, audio = _folders(args.corpus), _folders(args.audio)
    progress = StepProgress(13, "prune")
    try:
        loaders.check_source(args.source)
        metadata = recover_pruned(
            args.source,
            Path(args.out),
            corpora,
            audio,
            recipe,
            Path(args.work) if args.work else None,
            args.resume,
            step=progress,
            log=lambda message: print(message, file=sys.stderr),
        )
    except (loaders.SourceError, ValueError, FileNotFoundError, KeyError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    wer = metadata["held_out_wer"]
    after = f", recovered {wer['recovered']['wer']}%" if "recovered" in wer else ""
    print(
        f"pruned to {len(metadata['pruned']['decoder'])} decoder blocks ({metadata['params_after'] / 1e6:.1f} M params) "
        f"in {sum(metadata['seconds'].values()):.0f} s: held-out WER unchanged {wer['reference']['wer']}%, "
        f"pruned {wer['pruned']['wer']}%{after}",
        file=sys.stderr,
    )
    print(args.out)
    return 0


def _lstm_side():
    _build_side()
    import edge_asr_build.lstm_recipe as recipe

    return recipe


def cmd_lstm_train(args) -> int:
    recipe = _lstm_side()
    hidden = [int(h) for h in args.hidden.split(",")]
    config = recipe.LstmRecipe(
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
    path = recipe.train_lstm(
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
    from edge_asr_build.cald import is_cald_checkpoint
    from edge_asr_build.lstm import is_lstm_checkpoint

    if not (is_lstm_checkpoint(path) or is_cald_checkpoint(path)):
        raise EdgeAsrError(
            f"{path}: not an LSTM-CTC checkpoint (expected the .json or .safetensors written by "
            "`edge-asr lstm train` or `edge-asr lstm convert`)"
        )
    return Path(path).with_suffix(".safetensors")


def _folders(paths: list[str] | None) -> list[Path]:
    for folder in paths or []:
        if not Path(folder).is_dir():
            raise EdgeAsrError(f"{folder}: no such folder")
    return [Path(p) for p in paths or []]


def cmd_lstm_convert(args) -> int:
    _lstm_side()
    from edge_asr_build import cald_train, loaders

    recipe = cald_train.CaldRecipe(
        layerwise_steps=args.layerwise_steps,
        joint_steps=args.joint_steps,
        head_steps=args.head_steps,
        ctc_steps=args.ctc_steps,
        seed=args.seed,
    )
    corpora, audio = _folders(args.corpus), _folders(args.audio)
    progress = StepProgress(6, "convert")
    try:
        loaders.check_source(args.source)
        path = cald_train.convert(
            Path(args.out),
            args.source,
            corpora,
            audio,
            recipe,
            Path(args.work) if args.work else None,
            args.resume,
            args.threads,
            step=progress,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except (loaders.SourceError, ValueError, FileNotFoundError) as e:
        raise EdgeAsrError(str(e)) from None
    finally:
        progress.close()
    print(path)
    return 0


def cmd_lstm_compress(args) -> int:
    recipe = _lstm_side()
    source = _lstm_checkpoint(args.source)
    if not 0 < args.ratio < 1:
        raise EdgeAsrError("--ratio must be between 0 and 1")
    from edge_asr_build.cald import is_cald_checkpoint

    if is_cald_checkpoint(source):
        from edge_asr_build import cald_train

        progress = StepProgress(3, "compress")
        try:
            path = cald_train.compress_and_recover(
                source,
                Path(args.out),
                args.ratio,
                args.steps,
                _folders(args.corpus),
                _folders(args.audio),
                work=Path(args.work) if args.work else None,
                resume=args.resume,
                threads=args.threads,
                step=progress,
                log=lambda m: print(m, file=sys.stderr, flush=True),
            )
        except (ValueError, FileNotFoundError) as e:
            raise EdgeAsrError(str(e)) from None
        finally:
            progress.close()
        print(path)
        return 0
    path = recipe.compress_and_recover(
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
    _lstm_side()
    from edge_asr_build.lstm_bundle import build_lstm_bundle

    source = _lstm_checkpoint(args.source)
    out = Path(args.out) if args.out else bundle_dir(f"{source.stem}-{args.precision}")
    formats = _formats(args.formats)
    progress = StepProgress(2 + (args.precision == "int8") + args.eval + len(formats) - 1, f"build {out.name}")
    try:
        manifest = build_lstm_bundle(
            source, out, args.precision, out.name, args.eval, args.threads, step=progress, formats=formats
        )
    finally:
        progress.close()
    size = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    held_out = manifest["evaluation"].get("held_out_synthetic")
    print(
        f"built {out} ({size:.2f} MB, {manifest['model']['parameters'] / 1e6:.2f} M params"
        + (f", held-out synthesized WER {held_out['wer']:.2f}%" if held_out else "")
        + ")"
    )
    return 0


def decoding_settings(args) -> "DecodingSettings":
    """What the decoding flags ask for (see `with_bundle`)."""
    from .hotwords import read_word_list
    from .settings import DecodingSettings

    words = read_word_list(getattr(args, "hotwords", None), getattr(args, "hotwords_file", None))
    words += read_word_list(getattr(args, "bias_words", None))
    guards = {
        "enabled": False if getattr(args, "no_guards", False) else None,
        "no_speech_threshold": getattr(args, "no_speech_threshold", None),
        "logprob_threshold": getattr(args, "logprob_threshold", None),
        "compression_ratio_threshold": getattr(args, "compression_ratio_threshold", None),
        "vad_gate": getattr(args, "vad_gate", None),
    }
    return DecodingSettings(
        beam=getattr(args, "beam", None),
        prompt=getattr(args, "prompt", None),
        hotwords=list(dict.fromkeys(words)),
        hotword_bonus=getattr(args, "bias", None),
        hotword_prompt=getattr(args, "hotword_prompt", None),
        timestamps=getattr(args, "timestamps", False),
        guards=guards,
        vad=getattr(args, "vad", "energy"),
        seed=getattr(args, "seed", 0),
        grammar=getattr(args, "grammar", None),
        grammar_threshold=getattr(args, "grammar_threshold", None),
    )


def _transcriber(args):
    from .transcriber import load_transcriber

    if (getattr(args, "beam", None) or 0) < 0:
        raise EdgeAsrError("--beam must be 0 (greedy) or more")
    return load_transcriber(
        args.bundle, threads=args.threads, settings=decoding_settings(args), backend=getattr(args, "backend", "auto")
    )


def cmd_transcribe(args) -> int:
    from .audio import load_audio
    from .writers import render

    if args.timestamps is None:
        args.timestamps = args.format in ("srt", "vtt")
    if args.format in ("srt", "vtt") and len(args.files) > 1 and not args.output_dir:
        raise EdgeAsrError(f"--format {args.format} with several files needs --output-dir")
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    transcriber = _transcriber(args)
    status = 0
    for path in args.files:
        try:
            audio = load_audio(path)
        except EdgeAsrError as e:
            print(f"edge-asr: error: {e}", file=sys.stderr)
            status = e.exit_code
            continue
        t = transcriber.transcribe(audio)
        text = render(args.format, t, str(path))
        if out_dir:
            target = out_dir / f"{Path(path).stem}.{args.format}"
            target.write_text(text, encoding="utf-8")
            print(f"{target}  [{t.audio_seconds:.2f} s audio, RTF {t.rtf:.3f}]", file=sys.stderr)
            continue
        if args.format == "txt" and len(args.files) > 1:
            text = f"{path}: {text}"
        print(text, end="", flush=True)
        if args.format == "txt":
            print(f"  [{t.audio_seconds:.2f} s audio, {t.wall_seconds:.3f} s, RTF {t.rtf:.3f}]", file=sys.stderr)
    return status


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{seconds % 60:05.2f}"


def cmd_listen(args) -> int:
    from .endpointer import Endpointer
    from .sources import BLOCK_SECONDS, FileSource, MicrophoneSource
    from .stream import StreamRecognizer
    from .vad import make_vad

    transcriber = _transcriber(args)
    # A streaming model answers within a block: small blocks keep its partials early. Whisper's final comes
    # at an endpoint, which the endpointer finds per voice-activity frame: a block is one such frame.
    block = args.block or (0.02 if hasattr(transcriber, "stream") else BLOCK_SECONDS)
    source = (
        FileSource(args.file, realtime=args.realtime, block_seconds=block)
        if args.file
        else MicrophoneSource(args.device, args.rate, block_seconds=block)
    )
    tty = sys.stderr.isatty() and not args.json

    def on_partial(p):
        if tty:
            print(f"\r\033[K… {p.text[-150:]}", end="", file=sys.stderr, flush=True)

    def on_final(f):
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        if args.json:
            print(json.dumps(f.to_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"[{_clock(f.start_s)} - {_clock(f.end_s)}] {f.text}", flush=True)

    endpointer = Endpointer(make_vad(args.vad), args.min_silence, args.max_utterance, args.pre_roll)
    recognizer = StreamRecognizer(transcriber, endpointer, args.partial_interval or None, on_partial, on_final)
    if not args.file:
        print(f"listening on {source.name} ({source.rate} Hz); Ctrl-C to stop", file=sys.stderr)
    try:
        for block in source:
            recognizer.feed(block)
    except KeyboardInterrupt:
        pass
    recognizer.finish()
    c = recognizer.counters
    guards = getattr(transcriber, "counters", None)
    print(
        f"{c.utterances} utterances, {c.audio_s:.1f} s audio, {c.processing_s:.1f} s processing, "
        f"RTF {c.rtf:.3f}, {source.dropped_frames} dropped frames"
        + (
            f"; guards: {guards.no_speech} no speech, {guards.vad_skipped} no voice activity, "
            f"{guards.fallbacks} fallbacks, {guards.loops_cut} loops cut"
            if guards
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def cmd_devices(args) -> int:
    from .sources import list_input_devices

    devices = list_input_devices()
    if not devices:
        print("no input devices found", file=sys.stderr)
        return 1
    for d in devices:
        print(f"{d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['default_rate']} Hz)")
    return 0


def cmd_daemon(args) -> int:
    from .daemon import Daemon, load_config

    return Daemon(load_config(args.config)).run()


def cmd_collect(args) -> int:
    from .collect import export, run_collect

    if args.csv:
        return export(args.db, args.csv)
    if not args.broker:
        raise EdgeAsrError("collect needs --broker HOST[:PORT] (or --csv FILE to export the database)")
    from .broker import BrokerSettings, topic_prefix

    host, _, port = args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
    if port and not port.isdigit():
        raise EdgeAsrError(f"--broker {args.broker}: expected HOST or HOST:PORT")
    settings = BrokerSettings(
        host=host,
        port=int(port) if port else None,
        tls=args.tls or bool(args.ca_file),
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        credentials=args.credentials,
    )
    return run_collect(settings, args.db, topic_prefix(args.prefix, "--prefix"), args.client_id, args.duration)


def cmd_bench(args) -> int:
    from .bench import run_bench

    transcriber = _transcriber(args)
    result = run_bench(transcriber, args.dirs, runs=args.runs)
    if args.json:
        if not args.hypotheses:
            for s in result["sets"].values():
                s.pop("hypotheses")
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"bundle {result['bundle']} on {result['backend']}: {result['bundle_mb']:.1f} MB, "
        f"{result['params'] / 1e6:.2f} M params, "
        f"{args.threads} threads, RTF median of {args.runs} runs"
        + (f", context {result['context']['mode']}" if result.get("context") else "")
    )
    print(f"{'set':22s} {'n':>4s} {'audio_s':>8s} {'words':>6s} {'WER%':>7s} {'RTF wall':>9s} {'RTF cpu':>8s}")
    for label, s in result["sets"].items():
        print(
            f"{label:22s} {s['n']:4d} {s['audio_s']:8.1f} {s['words']:6d} {s['wer']:7.2f} {s['rtf_wall']:9.4f} {s['rtf_cpu']:8.4f}"
        )
    if len(result["sets"]) > 1:
        n = sum(s["n"] for s in result["sets"].values())
        print(
            f"{'pooled':22s} {n:4d} {result['audio_s']:8.1f} {result['words']:6d} {result['wer']:7.2f} "
            f"{result['rtf_wall']:9.4f} {result['rtf_cpu']:8.4f}"
        )
    print(f"peak RSS {result['peak_rss_mb']} MB")
    if result.get("guards"):
        g = result["guards"]
        print(
            f"guards (first pass): {g['windows']} windows, {g['no_speech']} no speech, {g['vad_skipped']} no voice "
            f"activity, {g['fallbacks']} fallbacks, {g['loops_cut']} loops cut"
        )
    return 0


def cmd_info(args) -> int:
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{m['name']}  ({bundle.path})")
    if bundle.family == "lstm-ctc":
        c = m["model"]["config"]
        layers = ", ".join(f"{h}" + (f"/p{p}" if p else "") for h, p in zip(c["hidden"], c["proj"]))
        kind = "Whisper encoder converted to LSTM blocks" if m["model"].get("architecture") == "cald" else "layers"
        print(
            f"  model      lstm-ctc {m['model']['precision']}, {m['model']['parameters'] / 1e6:.2f} M params, "
            f"{kind} {layers}, {len(m['tokenizer']['alphabet']) - 1} characters"
        )
    else:
        print(
            f"  model      whisper {m['model']['precision']}, {m['model']['parameters'] / 1e6:.2f} M params, "
            f"{'multilingual' if m['model']['multilingual'] else 'English-only'}"
        )
    print(f"  source     {m['source']['format']} {m['source']['path']} (sha256 {m['source']['sha256'][:16]}…)")
    print(f"  formats    {', '.join(bundle.formats)}")
    if bundle.family == "whisper":
        print(f"  context    {ContextPolicy.from_manifest(m).describe()}")
        from .guards import Guards

        g = Guards.from_manifest(m)
        print(
            f"  guards     no speech above {g.no_speech_threshold} with mean log-probability below "
            f"{g.logprob_threshold} (alone above {g.certain_no_speech_threshold}); loops and compression "
            f"ratio above {g.compression_ratio_threshold} fall back to temperatures {list(g.temperatures)[1:]}"
        )
        if m.get("adaptation"):
            a = m["adaptation"]
            what = ", ".join(
                filter(None, [a.get("kind"), a.get("rank") and f"LoRA rank {a['rank']}", f"sha256 {a['sha256'][:16]}…"])
            )
            print(
                f"  adapted    {a['delta']} ({what}), held-out loss "
                f"{a['held_out_loss']['before']} -> {a['held_out_loss']['after']}"
            )
            if a.get("pruned"):
                print(
                    f"  pruned     decoder blocks kept {a['pruned']['decoder']}, encoder blocks kept {a['pruned']['encoder']}"
                )
    for name, f in m["files"].items():
        print(f"  file       {name:22s} {f['bytes'] / 1e6:8.2f} MB  sha256 {f['sha256'][:16]}…")
    for name, ev in m.get("evaluation", {}).items():
        print(f"  evaluation {name}: WER {ev['wer']:.2f}% on {ev['words']} words ({ev.get('description', ev['set'])})")
    return 0


def cmd_synth(args) -> int:
    _build_side()
    from edge_asr_build.synth import synthetic_set

    print(synthetic_set(args.count, seed=args.seed, voice=args.voice, folder=Path(args.out)))
    return 0


def cmd_demo(args) -> int:
    """Build the default bundle once (cached), speak a sentence, transcribe it, report RTF."""
    _build_side()
    from edge_asr_build.synth import synthesize, write_wav

    from .audio import load_audio
    from .paths import home

    default = bundle_dir(DEFAULT_BUNDLE)
    if not _has_formats(default, DEMO_FORMATS):
        print(f"building the default bundle {DEFAULT_BUNDLE} (once; cached in {default})", file=sys.stderr)
        build_bundle("tiny.en", "int8", default, None, 12, args.threads, formats=DEMO_FORMATS, context="auto")
    wav = home() / "demo" / "maintenance.wav"
    if not wav.exists():
        wav.parent.mkdir(parents=True, exist_ok=True)
        write_wav(wav, synthesize(DEMO_SENTENCE))
    args.bundle = str(default)
    t = _transcriber(args).transcribe(load_audio(wav))
    print(
        f"bundle:     {DEFAULT_BUNDLE} (tiny.en adapted to each window's length, int8; "
        f"`edge-asr build --context full` makes the 30 s model)"
    )
    print(f"audio:      {wav} ({t.audio_seconds:.2f} s, synthesized)")
    print(f"reference:  {DEMO_SENTENCE}")
    print(f"transcript: {t.text}")
    print(
        f"RTF:        {t.rtf:.3f} wall, {t.rtf_cpu:.3f} CPU ({t.wall_seconds * 1000:.0f} ms, {args.threads} threads, "
        f"ONNX Runtime)"
    )
    args.backend = "tflite"  # the bundle's LiteRT model, as devices without ONNX Runtime run it
    lite = _transcriber(args).transcribe(load_audio(wav))
    args.backend = "auto"
    print(
        f"LiteRT:     {lite.text}  (RTF {lite.rtf:.3f} wall, {lite.rtf_cpu:.3f} CPU; "
        + (
            "the same text as ONNX Runtime)"
            if lite.text == t.text
            else "its own int8 quantization: the text differs from ONNX Runtime's)"
        )
    )
    peak = _recognizer_peak_rss_mb(default, wav, args.threads)
    if peak:
        print(f"memory:     peak RSS {peak:.0f} MB (a process that only loads the bundle and transcribes the clip)")
    _demo_stream(args, home() / "demo")
    return 0


# Run in a process of its own: VmHWM (the peak RSS) starts afresh at exec, whereas ru_maxrss would also
# count the pages this process (torch, the build) had when it forked the child.
_PEAK_RSS_CHILD = """import sys
from edge_asr.audio import load_audio
from edge_asr.transcriber import load_transcriber
load_transcriber(sys.argv[1], int(sys.argv[2])).transcribe(load_audio(sys.argv[3]))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _recognizer_peak_rss_mb(bundle: Path, wav: Path, threads: int) -> float | None:
    """Peak RSS of a process that only loads `bundle` and transcribes `wav` (this one also built and
    synthesized); None where that cannot be measured (no /proc)."""
    import subprocess

    if not Path("/proc/self/status").exists():
        return None
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_CHILD, str(bundle), str(threads), str(wav)],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(done.stdout.split()[-1]) / 1024 if done.returncode == 0 and done.stdout.strip() else None


def _demo_stream(args, folder: Path) -> None:
    """Live: three dictated sentences with pauses, played at real-time pace through the streaming path."""
    import numpy as np
    from edge_asr_build.synth import synthesize, write_wav

    from .endpointer import Endpointer
    from .sources import FileSource
    from .stream import StreamRecognizer
    from .vad import EnergyVad

    wav = folder / "stream.wav"
    if not wav.exists():
        pause = np.zeros(24000, dtype=np.float32)
        write_wav(wav, np.concatenate([pause] + [x for text in DEMO_STREAM for x in (synthesize(text), pause)]))
    source = FileSource(str(wav), realtime=True)

    def on_final(f):
        print(
            f"  [{_clock(f.start_s)} - {_clock(f.end_s)}] {f.text}  "
            f"(final {f.emitted - source.started - f.last_speech_s:.2f} s after speech ended, RTF {f.rtf:.3f})"
        )

    print(f"live:       {wav} as a real-time stream ({source.duration_s:.1f} s), min silence 0.5 s")
    recognizer = StreamRecognizer(_transcriber(args), Endpointer(EnergyVad(), min_silence=0.5), None, on_final=on_final)
    for block in source:
        recognizer.feed(block)
    recognizer.finish()
    c = recognizer.counters
    print(f"            {c.utterances} utterances, RTF {c.rtf:.3f}, {source.dropped_frames} dropped frames")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-asr", description="Offline speech recognition for edge devices.")
    parser.add_argument("--version", action="version", version=f"edge-asr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_threads(p):
        p.add_argument("--threads", type=int, help="CPU threads (default: $EDGE_ASR_THREADS, else 2)")
        return p

    def training_options(p):
        """What every reference-matching command (adapt, recover, prune) takes: audio, seed, device, resume."""
        p.add_argument(
            "--corpus",
            action="append",
            default=[],
            metavar="DIR",
            help="a recorded corpus, used unlabelled: speechocean762 or the wake-word benchmark's audio/ "
            "(repeatable; their held-out speakers select the result)",
        )
        p.add_argument("--audio", action="append", default=[], metavar="DIR", help="your own recordings (repeatable)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
        p.add_argument("--work", help="folder for the reference states and checkpoints (default: in $EDGE_ASR_HOME)")
        p.add_argument(
            "--resume",
            action="store_true",
            help="go on from the checkpoint of an earlier, stopped run (reference states are always reused)",
        )

    def with_bundle(p):
        p.add_argument(
            "--bundle",
            default=str(bundle_dir(DEFAULT_BUNDLE)),
            help=f"bundle directory (default: {bundle_dir(DEFAULT_BUNDLE)})",
        )
        p.add_argument(
            "--backend",
            choices=BACKENDS,
            default="auto",
            help="onnx (ONNX Runtime), ort (ONNX Runtime, mobile-format files), tflite (LiteRT); "
            "auto: ONNX Runtime if installed, else LiteRT",
        )
        decoding = p.add_argument_group("decoding")
        decoding.add_argument(
            "--beam",
            type=int,
            default=None,
            metavar="N",
            help="beam search width for every window, 0: greedy (default: the bundle's way; "
            "the adapted model: beam 5 on windows up to 5 s, greedy beyond)",
        )
        decoding.add_argument(
            "--prompt", metavar="TEXT", help="Whisper: text the speech follows on from (style, spelling of names)"
        )
        decoding.add_argument(
            "--hotwords",
            metavar="WORDS",
            help="favour these words or phrases, comma-separated (machine names, part codes); not forced",
        )
        decoding.add_argument("--hotwords-file", metavar="FILE", help="the same, one per line ('#' comments)")
        decoding.add_argument("--bias-words", metavar="WORDS", help=argparse.SUPPRESS)  # the older name of --hotwords
        decoding.add_argument(
            "--hotword-prompt",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="Whisper: also name the hotwords in the prompt (default: the bundle's, on)",
        )
        decoding.add_argument(
            "--bias",
            type=float,
            metavar="X",
            help="hotword strength: logits per token (Whisper) or nats per character (LSTM-CTC); default: the bundle's",
        )
        command = p.add_argument_group("command mode (Whisper)")
        command.add_argument(
            "--grammar",
            metavar="FILE",
            help="say only phrases of this grammar (GBNF subset, or one phrase per line), "
            "and [unk] for anything else; examples in examples/grammars/",
        )
        command.add_argument(
            "--grammar-threshold",
            type=float,
            metavar="C",
            help="confidence below which a phrase is rejected as [unk] (default: the bundle's, "
            f"else {DEFAULT_REJECTION_THRESHOLD})",
        )
        guards = p.add_argument_group("guards against text from silence, noise and loops (Whisper)")
        guards.add_argument(
            "--no-speech-threshold",
            type=float,
            metavar="P",
            help="probability of <|nospeech|> above which an improbable window is dropped (default: the bundle's, 0.7)",
        )
        guards.add_argument(
            "--logprob-threshold",
            type=float,
            metavar="L",
            help="mean token log-probability below which a window is improbable (default -1.0)",
        )
        guards.add_argument(
            "--compression-ratio-threshold",
            type=float,
            metavar="R",
            help="text compression ratio above which a window is decoded again hotter (default 2.4)",
        )
        guards.add_argument(
            "--vad-gate",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="also drop windows in which the voice activity detector finds no speech",
        )
        guards.add_argument("--vad", choices=["energy", "silero"], default="energy", help="voice activity detector")
        guards.add_argument(
            "--no-guards", action="store_true", help="decode every window once, as it comes (no gate, no fallback)"
        )
        guards.add_argument("--seed", type=int, default=0, help="seed of the fallback sampling")
        return with_threads(p)

    p = with_threads(sub.add_parser("build", help="build a bundle from a pretrained Whisper (needs [build])"))
    p.add_argument(
        "--source",
        default="tiny.en",
        help="'tiny.en' (embedded), a CTranslate2 dir, an openai-whisper .pt, a Hugging Face dir or hub id",
    )
    p.add_argument("--precision", choices=["int8", "int4", "fp32"], default="int8")
    p.add_argument("--out", help="bundle directory (default: $EDGE_ASR_HOME/bundles/NAME-PRECISION)")
    p.add_argument("--tokenizer", help="tokenizer.json, for checkpoints that carry none")
    p.add_argument(
        "--eval",
        type=int,
        default=12,
        metavar="N",
        help="record WER on N synthesized sentences in the manifest (0: skip)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the bundle exists")
    p.add_argument(
        "--formats",
        default="onnx",
        metavar="LIST",
        help="model formats in the bundle, comma-separated: onnx (always), ort, tflite (default onnx)",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="the compact model: activation-aware factors with measured ranks and the recovered delta "
        "shipped for tiny.en (30%% fewer parameters; less accurate on rare words, see the README)",
    )
    p.add_argument("--compact-delta", metavar="DELTA", help="the compact delta for --compact (from `edge-asr recover`)")
    p.add_argument(
        "--context",
        metavar="auto|full|SECONDS",
        help="encoder window: auto (the audio's own length + margin, bucketed; the adapted model: the "
        "default for tiny.en), full (Whisper's 30 s: the default for other sources and --compact), "
        "or a fixed number of seconds",
    )
    p.add_argument(
        "--delta", help="the adapted delta for --context auto|SECONDS (default: the one shipped for tiny.en)"
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("adapt", help="adapt a Whisper to short context by reference matching (needs [build])")
    p.add_argument("--source", default="tiny.en", help="any model source `build` accepts")
    p.add_argument("--out", required=True, help="the delta file to write (.safetensors; a .json summary beside it)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    training_options(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser(
        "prune",
        help="remove decoder blocks by measured importance, recover and adapt to short "
        "context by reference matching (needs [build])",
    )
    p.add_argument("--source", default="base", help="any model source `build` accepts (default: base)")
    p.add_argument("--decoder-layers", type=int, default=4, metavar="N", help="decoder blocks to keep (default 4)")
    p.add_argument("--out", required=True, help="the delta file to write (.safetensors; a .json summary beside it)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's; 0 measures and prunes only)")
    p.add_argument("--train-clips", type=int, help="training clips the reference transcribes (default 700)")
    training_options(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("compress", help="factor a Whisper into a smaller one by joint low-rank SVD (needs [build])")
    p.add_argument("--source", default="tiny.en", help="any model source `build` accepts")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--keep", type=float, help="fraction of all parameters to keep, e.g. 0.55")
    target.add_argument("--energy", type=float, help="share of each matrix's singular-value energy to keep, e.g. 0.95")
    p.add_argument(
        "--parts",
        help="comma-separated: encoder-attention, encoder-mlp, decoder-attention, decoder-mlp, "
        "embedding (default: decoder-attention,decoder-mlp,embedding)",
    )
    p.add_argument(
        "--attention",
        choices=["joint", "independent"],
        default="joint",
        help="product twins factored jointly per head, or each attention matrix alone",
    )
    p.add_argument("--frequent-tokens", type=int, default=4000, help="token ids kept exact in the embedding")
    p.add_argument(
        "--factors",
        choices=["activation", "plain"],
        default="activation",
        help="SVD weighted by each matrix's input moments on calibration audio (default), or plain SVD",
    )
    p.add_argument(
        "--ranks",
        choices=["measured", "energy"],
        default="energy",
        help="ranks from each matrix's measured output distortion (needs --keep; minutes), or from "
        "singular-value energy (default)",
    )
    p.add_argument("--out", required=True, help="output path (writes OUT.safetensors and OUT.json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "recover",
        help="make a compact delta: activation-aware factors, measured ranks, recovery "
        "by reference matching (needs [build])",
    )
    p.add_argument("--source", default="tiny.en", help="any model source `build` accepts")
    p.add_argument("--out", required=True, help="the delta file to write (.safetensors; a .json summary beside it)")
    p.add_argument("--keep", type=float, help="fraction of all parameters to keep (default: the recipe's 0.70)")
    p.add_argument("--ranks-from", metavar="DELTA", help="take the ranks of this delta instead of measuring them")
    p.add_argument("--steps", type=int, help="recovery steps (default 0: factors only; 300 runs the recipe's recovery)")
    training_options(p)
    p.set_defaults(func=cmd_recover)

    lstm = sub.add_parser("lstm", help="streaming LSTM-CTC models: train, convert, compress, build (needs [build])")
    lstm_sub = lstm.add_subparsers(dest="lstm_command", required=True, metavar="STEP")
    p = with_threads(lstm_sub.add_parser("train", help="train on synthesized speech (and teacher-labelled audio)"))
    p.add_argument("--out", required=True, help="output path (writes OUT.safetensors and OUT.json)")
    p.add_argument("--utterances", type=int, default=7000, help="synthesized training utterances (default 7000)")
    p.add_argument("--copies", type=int, default=2, help="augmented copies of each (default 2)")
    p.add_argument("--hidden", default="256,256,256", help="hidden units per layer (default 256,256,256)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--audio",
        action="append",
        metavar="DIR",
        help="folder of your own recordings, labelled by the Whisper teacher (repeatable)",
    )
    p.add_argument("--teacher", help="Whisper bundle that labels --audio (default: the default bundle)")
    p.add_argument(
        "--sentence-share",
        type=float,
        default=1.0,
        help="share of dictation sentences to train on (default 1; less puts digits and commands first)",
    )
    p.add_argument("--init", metavar="CHECKPOINT", help="go on training this checkpoint (a fresh schedule)")
    p.set_defaults(func=cmd_lstm_train)
    p = with_threads(
        lstm_sub.add_parser(
            "compress",
            help="joint SVD of recurrent and next-layer matrices, then recovery against the uncompressed model",
        )
    )
    p.add_argument("source", help="checkpoint from `edge-asr lstm train` (.json or .safetensors)")
    p.add_argument("--out", required=True, help="output path (writes OUT.safetensors and OUT.json)")
    p.add_argument("--ratio", type=float, default=1 / 3, help="share of LSTM matrix parameters to keep (default 1/3)")
    p.add_argument("--epochs", type=int, default=3, help="recovery epochs (default 3; 0: SVD only)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of KL to the uncompressed model")
    p.add_argument(
        "--steps", type=int, default=300, help="recovery steps for a converted model (default 300; 0: SVD only)"
    )
    p.add_argument(
        "--corpus", action="append", metavar="DIR", help="converted model: the conversion's recorded corpora"
    )
    p.add_argument("--audio", action="append", metavar="DIR", help="converted model: the conversion's --audio folders")
    p.add_argument("--work", help="converted model: folder of the conversion's data and checkpoints")
    p.add_argument("--resume", action="store_true", help="converted model: go on from a stopped recovery")
    p.set_defaults(func=cmd_lstm_compress)
    p = with_threads(
        lstm_sub.add_parser(
            "convert",
            help="convert Whisper's encoder to a streaming LSTM encoder (layerwise distillation), with a CTC head",
        )
    )
    p.add_argument("--out", required=True, help="output path (writes OUT.safetensors and OUT.json)")
    p.add_argument("--source", default="tiny.en", help="the Whisper model to convert (default tiny.en)")
    p.add_argument(
        "--corpus",
        action="append",
        metavar="DIR",
        help="recorded speech used unlabelled: a speechocean762 checkout, wake-word-benchmark/audio",
    )
    p.add_argument("--audio", action="append", metavar="DIR", help="folder of your own recordings (repeatable)")
    p.add_argument("--layerwise-steps", type=int, default=400)
    p.add_argument("--joint-steps", type=int, default=400)
    p.add_argument("--head-steps", type=int, default=1500)
    p.add_argument("--ctc-steps", type=int, default=3000, help="end-to-end CTC steps (with stream matching)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder for the teacher states and stage checkpoints (default: in $EDGE_ASR_HOME)")
    p.add_argument("--resume", action="store_true", help="go on from the stages of an earlier, stopped run")
    p.set_defaults(func=cmd_lstm_convert)
    p = with_threads(lstm_sub.add_parser("build", help="export a checkpoint as a streaming bundle"))
    p.add_argument("source", help="checkpoint (.json or .safetensors)")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--out", help="bundle directory (default: $EDGE_ASR_HOME/bundles/NAME-PRECISION)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the held-out evaluation")
    p.add_argument(
        "--formats",
        default="onnx",
        metavar="LIST",
        help="model formats in the bundle, comma-separated: onnx (always), ort, tflite (default onnx)",
    )
    p.set_defaults(func=cmd_lstm_build)

    p = with_bundle(sub.add_parser("transcribe", help="transcribe audio files"))
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--format",
        choices=WRITERS,
        default="txt",
        help="txt (text), json (one object per file: segments, timings, RTF), srt or vtt (subtitles)",
    )
    p.add_argument("--json", action="store_const", const="json", dest="format", help="the same as --format json")
    p.add_argument(
        "--timestamps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Whisper: segments timed by its timestamp tokens (default: on for srt and vtt; otherwise "
        "a segment per window cut at pauses)",
    )
    p.add_argument("--output-dir", metavar="DIR", help="write FILE.<format> per input here instead of to stdout")
    p.set_defaults(func=cmd_transcribe)

    p = with_bundle(sub.add_parser("listen", help="live transcription from the microphone or a file as a stream"))
    p.add_argument("--file", help="stream this audio file ('-': stdin) instead of the microphone")
    p.add_argument("--realtime", action="store_true", help="with --file: play it at real-time pace")
    p.add_argument("--device", help="input device (index or name; see `edge-asr devices`)")
    p.add_argument("--rate", type=int, help="device sample rate (default: the device's own); resampled to 16 kHz")
    p.add_argument("--min-silence", type=float, default=0.5, help="seconds of silence that end an utterance")
    p.add_argument("--max-utterance", type=float, default=20.0, help="longer speech is split at its quietest point")
    p.add_argument("--pre-roll", type=float, default=0.3, help="seconds of audio kept before speech onset")
    p.add_argument(
        "--block",
        type=float,
        help="seconds of audio per block from the source (default: 0.02 for LSTM-CTC bundles, 0.032 for Whisper)",
    )
    p.add_argument(
        "--partial-interval",
        type=float,
        default=1.0,
        help="Whisper: re-decode the growing utterance every N seconds of audio (0: no partials); "
        "LSTM-CTC bundles give partials as their characters come",
    )
    p.add_argument("--json", action="store_true", help="finals as JSON lines with timings")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("devices", help="list audio input devices")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("daemon", help="run as a service: TOML config, JSONL output, status endpoint")
    p.add_argument("--config", required=True, help="TOML file (example: firmware_tools/edge-asr.toml)")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser(
        "collect",
        help="plant side: store the fleet's transcripts from an MQTT broker in SQLite "
        "(needs [mqtt]); --csv exports them",
    )
    p.add_argument("--db", required=True, help="SQLite file, made if absent (one row per transcript id)")
    p.add_argument("--broker", metavar="HOST[:PORT]", help="the MQTT broker (port: 1883, or 8883 with TLS)")
    p.add_argument("--prefix", default="edge-asr", help="topic prefix the devices use (default edge-asr)")
    p.add_argument(
        "--client-id",
        default="edge-asr-collect",
        help="fixed, so the broker keeps this subscriber's session while it is away",
    )
    p.add_argument("--tls", action="store_true", help="TLS with the system's CAs (or --ca-file)")
    p.add_argument("--ca-file", help="CA certificate that signed the broker's (implies --tls)")
    p.add_argument("--cert-file", help="client certificate, where the broker asks for one")
    p.add_argument("--key-file", help="the client certificate's key")
    p.add_argument("--credentials", metavar="FILE", help="a file holding username:password on one line")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C or SIGTERM)")
    p.add_argument("--csv", metavar="FILE", help="export the database as CSV (- for stdout) and exit")
    p.set_defaults(func=cmd_collect)

    p = with_bundle(sub.add_parser("bench", help="WER, RTF and peak memory on folders with refs.tsv"))
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--runs", type=int, default=3, help="timed passes; RTF is their median (default 3)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--hypotheses", action="store_true", help="with --json: include every hypothesis")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="show a bundle's manifest")
    p.add_argument("--bundle", default=str(bundle_dir(DEFAULT_BUNDLE)))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("synth", help="synthesize a speech set (audio + refs.tsv) for bench (needs [build])")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voice", help="piper voice .onnx (default: en_US-joe-medium)")
    p.set_defaults(func=cmd_synth)

    p = with_threads(
        sub.add_parser(
            "demo", help="build the default bundle, transcribe a synthesized sentence, then a synthesized live stream"
        )
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):
            args.threads = resolve_threads(args.threads)
        return args.func(args)
    except EdgeAsrError as e:
        print(f"edge-asr: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
