#!/usr/bin/env python3
"""WER against parameters, MB, peak RSS and RTF of compressed tiny.en: plain against activation-aware
factors at the same measured ranks, without and with recovery, int8 against int4 (fp32 where asked).

  python benchmarks/compression_sweep.py ../shared/data/dev/ljspeech ../shared/data/dev/arctic \\
      ../shared/data/dev/jfk --keep 0.85 0.70 0.60 --recovered edge_asr_build/deltas/tiny.en-compact.safetensors \\
      --plot benchmarks/results/compression_sweep.png

Ranks are measured once (`compact.measure_structure`, on the recipe's calibration clips) for each --keep;
each point is then a bundle built by the build step's own passes and measured by `edge-asr bench` in its
own process (so that peak RSS is the bundle's alone): 2 threads, RTF the median of --runs runs. Points
`--recovered` are compact deltas (`edge-asr recover`), built as `edge-asr build --compact` builds them.
A table is printed; with --plot, WER against MB, parameters, peak RSS and RTF is saved as one PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(bundle: Path, dirs: list[str], runs: int, threads: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_asr",
            "bench",
            "--json",
            "--bundle",
            str(bundle),
            "--backend",
            "onnx",
            "--runs",
            str(runs),
            "--threads",
            str(threads),
            *dirs,
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"bench failed on {bundle}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="folders with audio and refs.tsv")
    parser.add_argument("--keep", type=float, nargs="*", default=[0.85, 0.70, 0.60])
    parser.add_argument("--precisions", nargs="*", default=["int8", "int4"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--recovered", nargs="*", default=[], help="compact deltas to add (after recovery)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plot", help="save the curves as this PNG")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from dataclasses import replace

    from edge_asr_build.bundle.pipeline import build_whisper_bundle
    from edge_asr_build.compression.compress import apply_structure, save_compressed
    from edge_asr_build.recipes.compact import CompactRecipe, calibrate, measure_structure
    from edge_asr_build.sources import load_whisper

    loaded = load_whisper("tiny.en")
    before = loaded.model.parameter_count()
    recipe = CompactRecipe()
    calibration = calibrate(loaded, recipe.calibration, lambda m: print(m, file=sys.stderr))
    rows = []

    def point(label: str, factors: str, recovery: str, params: int, build) -> None:
        for precision in args.precisions:
            with tempfile.TemporaryDirectory() as tmp:
                bundle = Path(tmp) / f"{label}-{precision}"
                build(bundle, precision)
                r = bench(bundle, args.dirs, args.runs, args.threads)
            rows.append(
                {
                    "label": label,
                    "factors": factors,
                    "recovery": recovery,
                    "precision": precision,
                    "params": params,
                    "bundle_mb": r["bundle_mb"],
                    "peak_rss_mb": r["peak_rss_mb"],
                    "wer": r["wer"],
                    "rtf_wall": r["rtf_wall"],
                    "rtf_cpu": r["rtf_cpu"],
                }
            )
            print(f"{label} {precision}: WER {r['wer']:.2f}", file=sys.stderr)

    point(
        "tiny.en",
        "-",
        "-",
        before,
        lambda out, precision: build_whisper_bundle("tiny.en", out, precision, evaluate_on=0),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for keep in args.keep:
            structure, report = measure_structure(loaded, replace(recipe, keep=keep), calibration)
            for factors, moments in (("plain", None), ("activation", calibration.moments)):
                model = apply_structure(copy.deepcopy(loaded.model), structure, moments=moments)
                checkpoint = save_compressed(model, Path(tmp) / f"keep{keep}-{factors}", {"teacher": "tiny.en"})
                point(
                    f"keep {keep:.2f}",
                    factors,
                    "no",
                    model.parameter_count(),
                    lambda out, precision: build_whisper_bundle(str(checkpoint), out, precision, evaluate_on=0),
                )
    for delta in args.recovered:
        from edge_asr_build.matching.lora import read_delta

        meta = read_delta(Path(delta))[1]
        point(
            Path(delta).stem,
            "activation",
            f"{meta['result']['steps']} steps",
            meta["params_after"],
            lambda out, precision: build_whisper_bundle(
                "tiny.en", out, precision, evaluate_on=0, compact_delta=Path(delta)
            ),
        )

    print(
        f"{'model':28} {'factors':>10} {'recovery':>10} {'prec':>5} {'params M':>9} {'fewer':>6} {'MB':>6} "
        f"{'RSS MB':>7} {'WER%':>7} {'RTF wall':>9} {'RTF cpu':>8}"
    )
    for r in rows:
        print(
            f"{r['label']:28} {r['factors']:>10} {r['recovery']:>10} {r['precision']:>5} {r['params'] / 1e6:9.2f} "
            f"{1 - r['params'] / before:6.1%} {r['bundle_mb']:6.1f} {r['peak_rss_mb']:7.0f} {r['wer']:7.2f} "
            f"{r['rtf_wall']:9.4f} {r['rtf_cpu']:8.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, args)
    return 0


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_of = [
        ("params", "parameters (M)", 1e-6),
        ("bundle_mb", "bundle MB", 1),
        ("peak_rss_mb", "peak RSS MB", 1),
        ("rtf_wall", "RTF (wall, 2 threads)", 1),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), sharey=True)
    series = {}
    for r in rows:
        key = (
            "uncompressed"
            if r["factors"] == "-"
            else f"{r['factors']} factors" + (", recovered" if r["recovery"] not in ("-", "no") else ""),
            r["precision"],
        )
        series.setdefault(key, []).append(r)
    markers = {"int8": "o", "int4": "s", "fp32": "^"}
    colors = {
        "uncompressed": "black",
        "plain factors": "tab:gray",
        "activation factors": "tab:blue",
        "activation factors, recovered": "tab:red",
    }
    for ax, (field, title, scale) in zip(axes, axes_of):
        for (kind, precision), points in series.items():
            pts = sorted((p[field] * scale, p["wer"]) for p in points)
            ax.plot(
                *zip(*pts),
                marker=markers[precision],
                color=colors.get(kind, "tab:green"),
                linestyle="-" if len(pts) > 1 else "none",
                label=f"{kind} {precision}",
            )
        ax.set_xlabel(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"WER % ({', '.join(Path(d).name for d in args.dirs)})")
    axes[-1].legend(fontsize=7)
    fig.suptitle("tiny.en compressed: WER against parameters, size, memory and speed")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
