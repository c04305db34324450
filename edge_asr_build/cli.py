"""`edge-asr-build`: the build step's commands. `edge-asr` forwards them (`edge-asr build` is `edge-asr-build
build`), so users keep one command; the runtime itself never imports this package.

Whisper: build, adapt, compress, recover, prune. Streaming LSTM-CTC models: lstm train, convert, compress, build.
Helpers: synth (a synthesized test set), demo (the README's main job).

A command's module is imported when it runs (`run` names it), so that `--help` answers at once and a machine
without the build step's dependencies gets one line that says which to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edge_asr import __version__
from edge_asr.errors import EdgeAsrError
from edge_asr.threads import resolve_threads

# The commands `edge-asr` forwards here (each also an entry point of the group `edge_asr.commands`).
COMMANDS = ("build", "adapt", "compress", "recover", "prune", "lstm", "synth", "demo")


def build_parser(prog: str = "edge-asr-build") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="The build step of edge-asr: pretrained models in, bundles out (needs edge-asr[build])."
    )
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

    p = with_threads(sub.add_parser("build", help="build a bundle from a pretrained Whisper"))
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
    p.set_defaults(run="commands.whisper:cmd_build")

    p = sub.add_parser("adapt", help="adapt a Whisper to short context by reference matching")
    p.add_argument("--source", default="tiny.en", help="any model source `build` accepts")
    p.add_argument("--out", required=True, help="the delta file to write (.safetensors; a .json summary beside it)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    training_options(p)
    p.set_defaults(run="commands.whisper:cmd_adapt")

    p = sub.add_parser(
        "prune",
        help="remove decoder blocks by measured importance, recover and adapt to short context by reference matching",
    )
    p.add_argument("--source", default="base", help="any model source `build` accepts (default: base)")
    p.add_argument("--decoder-layers", type=int, default=4, metavar="N", help="decoder blocks to keep (default 4)")
    p.add_argument("--out", required=True, help="the delta file to write (.safetensors; a .json summary beside it)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's; 0 measures and prunes only)")
    p.add_argument("--train-clips", type=int, help="training clips the reference transcribes (default 700)")
    training_options(p)
    p.set_defaults(run="commands.whisper:cmd_prune")

    p = sub.add_parser("compress", help="factor a Whisper into a smaller one by joint low-rank SVD")
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
    p.set_defaults(run="commands.whisper:cmd_compress")

    p = sub.add_parser(
        "recover", help="make a compact delta: activation-aware factors, measured ranks, recovery by reference matching"
    )
    p.add_argument("--source", default="tiny.en", help="any model source `build` accepts")
    p.add_argument("--out", required=True, help="the delta file to write (.safetensors; a .json summary beside it)")
    p.add_argument("--keep", type=float, help="fraction of all parameters to keep (default: the recipe's 0.70)")
    p.add_argument("--ranks-from", metavar="DELTA", help="take the ranks of this delta instead of measuring them")
    p.add_argument("--steps", type=int, help="recovery steps (default 0: factors only; 300 runs the recipe's recovery)")
    training_options(p)
    p.set_defaults(run="commands.whisper:cmd_recover")

    lstm = sub.add_parser("lstm", help="streaming LSTM-CTC models: train, convert, compress, build")
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
    p.set_defaults(run="commands.lstm:cmd_lstm_train")
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
    p.set_defaults(run="commands.lstm:cmd_lstm_compress")
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
    p.set_defaults(run="commands.lstm:cmd_lstm_convert")
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
    p.set_defaults(run="commands.lstm:cmd_lstm_build")

    p = sub.add_parser("synth", help="synthesize a speech set (audio + refs.tsv) for bench")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voice", help="piper voice .onnx (default: en_US-joe-medium)")
    p.set_defaults(run="commands.whisper:cmd_synth")

    p = with_threads(
        sub.add_parser(
            "demo", help="build the default bundle, transcribe a synthesized sentence, then a synthesized live stream"
        )
    )
    p.set_defaults(run="commands.demo:cmd_demo")
    return parser


def _command(run: str):
    """The function `run` ("module:function", a module of this package) names, imported now."""
    module, function = run.split(":")
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)
    except ImportError as e:
        if e.name and e.name.split(".")[0] in (__package__, "edge_asr"):
            raise
        raise EdgeAsrError(
            f"this command needs the build step's dependencies ({e.name} is missing): pip install 'edge-asr[build]'"
        ) from None


def main(argv: list[str] | None = None, prog: str = "edge-asr-build") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if hasattr(args, "threads"):
            args.threads = resolve_threads(args.threads)
        return _command(args.run)(args)
    except EdgeAsrError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
