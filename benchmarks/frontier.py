#!/usr/bin/env python3
"""The size / accuracy / speed frontier: WER against MB, RTF and peak RSS for every bundle given, on ONNX
Runtime and LiteRT, with peers from the same run.

  python benchmarks/frontier.py --pooled ../shared/data/dev/ljspeech ../shared/data/dev/arctic \\
      ../shared/data/dev/jfk --digits ../shared/data/dev/fsdd \\
      --bundle "tiny.en int8 (default)=~/.cache/edge-asr/bundles/tiny.en-int8" \\
      --bundle "base int4=~/.cache/edge-asr/bundles/base-int4" \\
      --plot benchmarks/results/frontier.png --json frontier.json

Each bundle is measured by `edge-asr bench --json` in its own process (so that peak RSS is its own), on
each backend its manifest holds: the pooled folders with RTF the median of --runs runs, the digits with
--digits-runs runs. Peers run through the shared `peers_bench.py` measurement loop (one warm-up, one pass):
its faster-whisper (tiny.en) and Moonshine, and faster-whisper on the embedded Whisper base, which
`peers_bench.py` does not know, by the same loop with the engine pointed at base. A table is printed; with
--plot, WER on the pooled folders against MB, RTF and peak RSS is drawn as one PNG.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEERS_SCRIPT = ROOT.parent / "shared" / "tools" / "peers_bench.py"
BACKENDS = {"onnx": "ONNX Runtime", "tflite": "LiteRT"}


def bench(bundle: Path, dirs: list[str], backend: str, runs: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "edge_asr",
        "bench",
        "--json",
        "--bundle",
        str(bundle),
        "--backend",
        backend,
        "--runs",
        str(runs),
        "--threads",
        str(threads),
        *dirs,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench failed on {bundle} ({backend}): {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def bundle_formats(bundle: Path) -> list[str]:
    from edge_asr.bundle import Bundle

    return Bundle.load(bundle, verify=False).formats


def peer(script: Path, name: str, dirs: list[str], threads: int) -> dict:
    """A peer's figures per folder (`peers_bench.py --child` output), run in its own process."""
    cmd = [
        sys.executable,
        __file__,
        "--peer-child",
        name,
        "--peers-script",
        str(script),
        "--threads",
        str(threads),
        *dirs,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(f"{name}: failed ({(out.stderr.strip().splitlines() or ['no output'])[-1]})", file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_child(script: Path, name: str, dirs: list[str], threads: int) -> None:
    """Run peers_bench's own measurement loop; "faster-whisper-base-<type>" points its engine at base."""
    spec = importlib.util.spec_from_file_location("peers_bench", script)
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    if name.startswith("faster-whisper-base-"):
        from faster_whisper import WhisperModel

        from edge_asr_build.sources import joined_base_dir

        model = WhisperModel(str(joined_base_dir()), device="cpu", compute_type=name.split("-")[3], cpu_threads=threads)

        def make_engine(_name, _threads):
            def run(audio):  # the arguments peers_bench gives faster-whisper tiny.en
                segments, _ = model.transcribe(
                    audio,
                    beam_size=1,
                    language="en",
                    without_timestamps=True,
                    condition_on_previous_text=False,
                    vad_filter=False,
                )
                return " ".join(s.text for s in segments)

            return run

        peers.make_engine = make_engine
    peers.child(name, dirs, threads)


def pooled(result: dict, words: dict[str, int], dirs: list[str]) -> dict:
    """A peer's pooled figures from its per-folder ones: WER weighted by reference words, RTF by audio."""
    sets = {k: v for k, v in result.items() if k != "peak_rss_mb" and k in words}
    n_words, audio = sum(words[k] for k in sets), sum(v["audio_s"] for v in sets.values())
    return {
        "wer": sum(v["wer"] * words[k] for k, v in sets.items()) / n_words,
        "rtf_wall": sum(v["rtf_wall"] * v["audio_s"] for v in sets.values()) / audio,
        "rtf_cpu": sum(v["rtf_cpu"] * v["audio_s"] for v in sets.values()) / audio,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    for ax, (key, label) in zip(
        axes, [("mb", "model MB"), ("rtf_wall", "RTF wall (pooled)"), ("peak_rss_mb", "peak RSS MB")]
    ):
        for row in rows:
            if row.get(key) is None:
                continue
            marker = {"ONNX Runtime": "o", "LiteRT": "s"}.get(row["backend"], "^")
            color = "C0" if row["system"].startswith("tiny") else "C1" if row["system"].startswith("base") else "C2"
            ax.scatter(row[key], row["wer"], marker=marker, color=color)
            ax.annotate(
                f"{row['system']} {row['backend'][:4]}",
                (row[key], row["wer"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel(label)
        ax.set_yscale("log")  # a few points near 5%, broken ones near 100%
        ax.set_ylabel("WER % (pooled folders, log scale)")
        ax.grid(alpha=0.3)
    fig.suptitle("tiny.en and base variants: circles ONNX Runtime, squares LiteRT, triangles peers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pooled", nargs="+", metavar="DIR", help="folders pooled into one WER (required)")
    ap.add_argument("--digits", metavar="DIR", help="a folder of short clips measured on its own (dev/fsdd)")
    ap.add_argument("--bundle", action="append", default=[], metavar="LABEL=DIR", help="repeatable")
    ap.add_argument("--peers", default="faster-whisper-int8,faster-whisper-base-int8,moonshine-base-en")
    ap.add_argument("--peers-script", type=Path, default=DEFAULT_PEERS_SCRIPT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--digits-runs", type=int, default=1)
    ap.add_argument("--backends", default="onnx,tflite", help="of those a bundle holds")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--peer-child", help=argparse.SUPPRESS)
    ap.add_argument("dirs", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_child:
        peer_child(args.peers_script, args.peer_child, args.dirs, args.threads)
        return 0
    if not args.pooled:
        ap.error("--pooled DIR [DIR ...] is required")

    rows, words = [], {}
    for spec in args.bundle:
        label, _, path = spec.partition("=")
        bundle = Path(path).expanduser()
        for backend in [b for b in bundle_formats(bundle) if b in args.backends.split(",")]:
            r = bench(bundle, args.pooled, backend, args.runs, args.threads)
            words = {k: v["words"] for k, v in r["sets"].items()}
            row = {
                "system": label,
                "backend": BACKENDS[backend],
                "params": r["params"],
                "mb": r["bundle_mb"],
                "wer": r["wer"],
                "rtf_wall": r["rtf_wall"],
                "rtf_cpu": r["rtf_cpu"],
                "peak_rss_mb": r["peak_rss_mb"],
            }
            if args.digits:
                d = bench(bundle, [args.digits], backend, args.digits_runs, args.threads)
                row |= {
                    "digits_wer": d["wer"],
                    "digits_rtf_wall": d["rtf_wall"],
                    "peak_rss_mb": max(row["peak_rss_mb"], d["peak_rss_mb"]),
                }
            rows.append(row)
            print(f"measured {label} on {BACKENDS[backend]}", file=sys.stderr)
    for name in filter(None, args.peers.split(",")):
        if not args.peers_script.exists():
            print(f"peers script not found at {args.peers_script}", file=sys.stderr)
            break
        dirs = [*args.pooled, *([args.digits] if args.digits else [])]
        r = peer(args.peers_script, name, dirs, args.threads)
        if not r:
            continue
        row = {"system": name, "backend": "peer", "params": None, "mb": None, "peak_rss_mb": r["peak_rss_mb"]}
        row |= pooled(r, words, args.pooled)
        if args.digits:
            d = next(v for k, v in r.items() if k != "peak_rss_mb" and k not in words)
            row |= {"digits_wer": d["wer"], "digits_rtf_wall": d["rtf_wall"]}
        rows.append(row)
        print(f"measured {name}", file=sys.stderr)

    print(
        f"{args.threads} threads; ours: RTF median of {args.runs} runs (digits: {args.digits_runs}); peers: one pass "
        "after a warm-up; WER: Whisper EnglishTextNormalizer + jiwer"
    )
    head = "| system | backend | params | MB | pooled WER % | RTF wall | RTF CPU | peak RSS MB |" + (
        " digits WER % | digits RTF wall |" if args.digits else ""
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        params = "" if r["params"] is None else f"{r['params'] / 1e6:.2f} M"
        mb = "" if r["mb"] is None else f"{r['mb']:.1f}"
        line = (
            f"| {r['system']} | {r['backend']} | {params} | {mb} | {r['wer']:.2f} | {r['rtf_wall']:.4f} | "
            f"{r['rtf_cpu']:.4f} | {r['peak_rss_mb']} |"
        )
        if args.digits:
            line += f" {r.get('digits_wer', float('nan')):.2f} | {r.get('digits_rtf_wall', float('nan')):.4f} |"
        print(line)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
