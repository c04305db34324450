#!/usr/bin/env python3
"""Real-time factor against clip length: our 30 s and dynamic-context bundles beside the peers, one run.

For each length (1, 2, 5, 10, 20 s) a folder of synthesized dictation cut to exactly that length is made
(our own sentences, the default piper voice); every system transcribes every folder, each in its own
process (`compare_peers.run_ours` / `run_peer`). Prints a table of wall RTF (median of 3 runs for ours),
CPU RTF and peak RSS per length, and writes a PNG of wall RTF against length.

  python benchmarks/context_rtf.py --bundle ~/.cache/edge-asr/bundles/tiny.en-int8 \\
      --bundle ~/.cache/edge-asr/bundles/tiny.en-auto-XXXXXXXX-int8 --decode litert=--backend tflite \\
      --png benchmarks/results/context_rtf.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import DEFAULT_PEERS, run_ours, run_peer  # noqa: E402

from edge_asr.frontend import SAMPLE_RATE  # noqa: E402

LENGTHS = (1, 2, 5, 10, 20)


def length_sets(root: Path, lengths=LENGTHS, per_length: int = 6) -> dict[float, Path]:
    """Folders of `per_length` clips of exactly L seconds (sentences joined with short pauses, then cut)."""
    from edge_asr_build.speech.sentences import general_sentences, maintenance_sentences, short_phrases
    from edge_asr_build.speech.synth import synthesize, write_wav

    sentences = [s for pair in zip(maintenance_sentences(60, 31), general_sentences(60, 31)) for s in pair]
    shorts = short_phrases(40, 31)
    folders = {}
    for length in lengths:
        folder = root / f"len{length:g}s"
        folders[length] = folder
        if (folder / "refs.tsv").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        pool = shorts if length <= 1 else sentences
        lines = []
        for i in range(per_length):
            pieces, texts, total, j = [], [], 0, i * 7
            while total < length * SAMPLE_RATE:
                text = pool[j % len(pool)]
                audio = synthesize(text)
                pieces += [audio, np.zeros(4000, np.float32)]
                texts.append(text)
                total += len(audio) + 4000
                j += 1
            clip = np.concatenate(pieces)
            clip = np.pad(clip, (0, max(0, length * SAMPLE_RATE - len(clip))))[: int(length * SAMPLE_RATE)]
            write_wav(folder / f"c{i:02d}.wav", clip)
            lines.append(f"c{i:02d}\t{' '.join(texts)}")  # cut clips: the reference is approximate, RTF is the point
        (folder / "refs.tsv").write_text("\n".join(lines) + "\n")
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="bundle directory (repeatable)")
    ap.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also run every bundle with these `edge-asr bench` options (e.g. 'litert=--backend tflite')",
    )
    ap.add_argument("--peers", default="faster-whisper-int8,moonshine-base-en")
    ap.add_argument("--peers-script", type=Path, default=DEFAULT_PEERS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sets", type=Path, default=Path.home() / ".cache" / "edge-asr" / "bench" / "lengths")
    ap.add_argument("--png", type=Path, help="write the curve here")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args()

    folders = length_sets(args.sets)
    dirs = [str(folders[L]) for L in LENGTHS]
    results: dict[str, dict[float, dict]] = {}
    variants = [("", [])] + [(d.split("=", 1)[0], d.split("=", 1)[1].split()) for d in args.decode]
    for bundle in args.bundle:
        for variant, options in variants:
            r = run_ours(bundle, dirs, args.threads, args.runs, options)
            name = f"edge-asr {r['bundle']}" + (f" {variant}" if variant else "")
            results[name] = {
                L: r["sets"][Path(d).parent.name + "/" + Path(d).name] | {"peak_rss_mb": r["peak_rss_mb"]}
                for L, d in zip(LENGTHS, dirs)
            }
    for peer in filter(None, args.peers.split(",")):
        r = run_peer(args.peers_script, peer, dirs, args.threads)
        if r:
            results[peer] = {
                L: r[Path(d).parent.name + "/" + Path(d).name] | {"peak_rss_mb": r["peak_rss_mb"]}
                for L, d in zip(LENGTHS, dirs)
            }

    print(f"{args.threads} threads; wall RTF (edge-asr: median of {args.runs} runs; peers: one run after a warm-up)")
    width = max(len(n) for n in results)
    print(f"{'system':{width}s} " + " ".join(f"{f'{L:g} s':>8s}" for L in LENGTHS) + f" {'cpu@1s':>8s} {'peak MB':>8s}")
    for name, by_length in results.items():
        print(
            f"{name:{width}s} "
            + " ".join(f"{by_length[L]['rtf_wall']:8.4f}" for L in LENGTHS)
            + f" {by_length[1]['rtf_cpu']:8.4f} {max(v['peak_rss_mb'] for v in by_length.values()):8d}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, by_length in results.items():
            ax.plot(LENGTHS, [by_length[L]["rtf_wall"] for L in LENGTHS], marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="clip length (s)",
            ylabel="wall RTF (lower is faster)",
            title=f"RTF against clip length, {args.threads} threads",
        )
        ax.set_xticks(LENGTHS, [f"{L:g}" for L in LENGTHS])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
