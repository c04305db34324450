"""The `edge-asr` command line: transcribe, listen, devices, daemon, collect, bench, info.

The build step's commands (build, adapt, compress, recover, prune, lstm, synth, demo) belong to the build
package, which registers them as entry points of the group `edge_asr.commands`; `edge-asr` forwards them
without importing that package itself.

Every failure a user can cause (bad audio, missing or modified bundle, unknown model source) ends in
one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import __version__
from .backend import BACKENDS
from .commands import DEFAULT_REJECTION_THRESHOLD
from .errors import EdgeAsrError
from .paths import DEFAULT_BUNDLE, bundle_dir
from .threads import resolve_threads
from .writers import WRITERS, short_clock

# Wyoming's usual port. Named here, not imported from service.wyoming: that module brings asyncio (3-4 MB of
# RSS) into every command.
DEFAULT_WYOMING_URI = "tcp://0.0.0.0:10300"


def decoding_settings(args):
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
    from .recognizer import load

    if (getattr(args, "beam", None) or 0) < 0:
        raise EdgeAsrError("--beam must be 0 (greedy) or more")
    return load(
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


def cmd_listen(args) -> int:
    from .endpointer import Endpointer
    from .sources import BLOCK_SECONDS, FileSource, MicrophoneSource
    from .stream import StreamRecognizer
    from .vad import make_vad

    transcriber = _transcriber(args)
    # A streaming model answers within a block: small blocks keep its partials early. Whisper's final comes
    # at an endpoint, which the endpointer finds per voice-activity frame: a block is one such frame.
    block = args.block or (0.02 if transcriber.streaming else BLOCK_SECONDS)
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
            print(f"[{short_clock(f.start_s)} - {short_clock(f.end_s)}] {f.text}", flush=True)

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
    guards = transcriber.counters
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
    from .service.daemon import Daemon, load_config

    return Daemon(load_config(args.config)).run()


def cmd_wyoming(args) -> int:
    from .service.wyoming import parse_uri, serve

    parse_uri(args.uri)  # before the model loads: a typo costs no wait
    recognizer = _transcriber(args)
    return serve(args.uri, recognizer, recognizer.bundle.manifest.name)


def cmd_collect(args) -> int:
    from .service.collect import export, run_collect

    if args.csv:
        return export(args.db, args.csv)
    if not args.broker:
        raise EdgeAsrError("collect needs --broker HOST[:PORT] (or --csv FILE to export the database)")
    from .service.broker import BrokerSettings, topic_prefix

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
            f"{label:22s} {s['n']:4d} {s['audio_s']:8.1f} {s['words']:6d} {s['wer']:7.2f} "
            f"{s['rtf_wall']:9.4f} {s['rtf_cpu']:8.4f}"
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
    from .info import describe

    bundle = Bundle.load(args.bundle)
    print(json.dumps(bundle.manifest.raw, indent=2) if args.json else "\n".join(describe(bundle)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-asr", description="Offline speech recognition for edge devices.")
    parser.add_argument("--version", action="version", version=f"edge-asr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_threads(p):
        p.add_argument("--threads", type=int, help="CPU threads (default: $EDGE_ASR_THREADS, else 2)")
        return p

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
    p.add_argument("--config", required=True, help="TOML file (example: edge_asr_deploy/edge-asr.toml)")
    p.set_defaults(func=cmd_daemon)

    p = with_bundle(
        sub.add_parser("wyoming", help="serve the Wyoming protocol (Home Assistant's Assist, Rhasspy); needs [wyoming]")
    )
    p.add_argument(
        "--uri", default=DEFAULT_WYOMING_URI, help=f"tcp://HOST:PORT or unix://PATH (default {DEFAULT_WYOMING_URI})"
    )
    p.set_defaults(func=cmd_wyoming)

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
    parser.runtime_commands = tuple(sub.choices)  # what main() does not forward
    return parser


FORWARDED = "edge_asr.commands"  # the entry-point group of commands other packages (the build step) add


def forwarded_commands() -> dict:
    """Commands other installed packages add: name -> entry point (read from metadata; nothing is imported)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=FORWARDED)}


def _warning_on_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"edge-asr: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.showwarning = _warning_on_one_line  # e.g. audio.AudioWarning: clipped samples
    parser = build_parser()
    if argv and argv[0] not in parser.runtime_commands:
        forwarded = forwarded_commands()
        if argv[0] in forwarded:
            try:
                command = forwarded[argv[0]].load()
            except ImportError as e:
                print(f"edge-asr: error: {argv[0]} needs the build step ({e.name} is missing)", file=sys.stderr)
                return 1
            return command(argv, prog="edge-asr")
        if argv[0] in ("-h", "--help"):
            parser.epilog = (
                "the build step's commands, with edge-asr[build]: " + ", ".join(forwarded) if forwarded else None
            )
    args = parser.parse_args(argv)
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
