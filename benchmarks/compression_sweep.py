#!/usr/bin/env python3
"""WER, bundle size and RTF of compressed Whisper models: several compression levels, joint product-twin
factorization against independent per-matrix SVD at the same parameter count, and with or without
recovery fine-tuning.

  python benchmarks/compression_sweep.py ../shared/data/dev/ljspeech ../shared/data/dev/arctic \\
      --keep 0.9 0.75 0.65 0.55 --recovered ~/.cache/edge-asr/models/tiny.en-compact-*.json \\
      --plot benchmarks/results/compression_sweep.png

Every point is an int8 bundle built by the same passes as `edge-asr build` and measured with
`edge-asr bench`'s code (RTF: median of --runs runs, 2 threads). Points without recovery are the SVD
alone; `--recovered` adds checkpoints written by `edge-asr recover` (or the compact default). A table is
printed; with --plot, WER against bundle MB is saved as a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def measure(source: str, dirs: list[str], work: Path, label: str, threads: int, runs: int) -> dict:
    from edge_asr.bench import run_bench
    from edge_asr.transcriber import Transcriber
    from edge_asr_build.pipeline import build_whisper_bundle

    bundle = work / label
    manifest = build_whisper_bundle(source, bundle, "int8", name=label, evaluate_on=0)
    result = run_bench(Transcriber(bundle, threads), dirs, runs=runs)
    return {"label": label, "params": manifest["model"]["parameters"], "bundle_mb": result["bundle_mb"],
            "wer": result["wer"], "rtf_wall": result["rtf_wall"], "rtf_cpu": result["rtf_cpu"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="folders with audio and refs.tsv")
    parser.add_argument("--source", default="tiny.en")
    parser.add_argument("--keep", type=float, nargs="*", default=[0.9, 0.75, 0.65, 0.55],
                        help="fractions of all parameters to keep (SVD without recovery)")
    parser.add_argument("--attention", nargs="*", default=["joint", "independent"], choices=["joint", "independent"])
    parser.add_argument("--parts", default="decoder-attention,decoder-mlp,embedding,encoder-attention")
    parser.add_argument("--recovered", nargs="*", default=[], help="recovered checkpoints (JSON) to add")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--plot", help="save WER against bundle MB as this PNG")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from edge_asr_build.pipeline import compress_checkpoint

    parts = tuple(args.parts.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append(measure(args.source, args.dirs, work, "uncompressed", args.threads, args.runs) | {"recovery": "-"})
        print(f"uncompressed: WER {rows[-1]['wer']:.2f}", file=sys.stderr)
        for keep in args.keep:
            for attention in args.attention:
                label = f"keep{keep:.2f}-{attention}"
                ckpt, report = compress_checkpoint(args.source, work / label, keep=keep, parts=parts, attention=attention)
                rows.append(measure(str(ckpt), args.dirs, work, label, args.threads, args.runs) | {"recovery": "no"})
                print(f"{label}: WER {rows[-1]['wer']:.2f}", file=sys.stderr)
        for ckpt in args.recovered:
            meta = json.loads(Path(ckpt).read_text())
            label = Path(ckpt).stem
            rows.append(measure(ckpt, args.dirs, work, label, args.threads, args.runs)
                        | {"recovery": f"{meta.get('recovery', {}).get('steps', '?')} steps"})
            print(f"{label}: WER {rows[-1]['wer']:.2f}", file=sys.stderr)

    base = rows[0]["params"]
    print(f"{'model':34} {'recovery':>10} {'params M':>9} {'fewer':>6} {'MB':>6} {'WER%':>7} {'RTF wall':>9} {'RTF cpu':>8}")
    for r in rows:
        print(f"{r['label']:34} {r['recovery']:>10} {r['params'] / 1e6:9.2f} {1 - r['params'] / base:6.0%} "
              f"{r['bundle_mb']:6.1f} {r['wer']:7.2f} {r['rtf_wall']:9.4f} {r['rtf_cpu']:8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = {"joint": ("o-", "product twins (joint SVD), no recovery"),
                  "independent": ("s--", "independent SVD, no recovery")}
        for attention, (style, name) in styles.items():
            pts = sorted((r["bundle_mb"], r["wer"]) for r in rows if r["label"].endswith(attention))
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        rec = [(r["bundle_mb"], r["wer"]) for r in rows if r["recovery"] not in ("-", "no")]
        if rec:
            ax.plot(*zip(*rec), "r*", markersize=12, label="after recovery fine-tuning")
        ax.axhline(rows[0]["wer"], color="gray", linestyle=":", label=f"uncompressed int8 ({rows[0]['bundle_mb']:.1f} MB)")
        ax.set_xlabel("bundle MB (int8)")
        ax.set_ylabel("WER % (pooled)")
        ax.set_yscale("log")
        ax.set_title(f"{args.source}: WER against size on {', '.join(Path(d).name for d in args.dirs)}")
        ax.legend(fontsize=8)
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
