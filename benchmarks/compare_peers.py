#!/usr/bin/env python3
"""Our bundles against the peers users would pick instead, on the same folders in one run.

Runs `edge-asr bench --json` for each bundle and `peers_bench.py` (faster-whisper int8/float32,
PocketSphinx), each in its own process so that every peak RSS is its own, and prints one table:
per folder and pooled WER, RTF (wall and CPU, median of 3 runs for ours), peak RSS and bundle size.

  python benchmarks/compare_peers.py ../shared/data/dev/ljspeech ../shared/data/dev/arctic \\
      --bundle ~/.cache/edge-asr/bundles/tiny.en-int8 --bundle ~/.cache/edge-asr/bundles/tiny.en-fp32

Pooled peer figures are derived from the peers' per-folder figures: WER weighted by reference words
(counted with the same normalizer), RTF weighted by audio seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEERS = ROOT.parent / "shared" / "tools" / "peers_bench.py"


def run_ours(bundle: str, dirs: list[str], threads: int, runs: int, decode: list[str] = ()) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "edge_asr",
        "bench",
        "--json",
        "--hypotheses",
        "--bundle",
        bundle,
        "--threads",
        str(threads),
        "--runs",
        str(runs),
        *decode,
        *dirs,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"edge-asr bench failed on {bundle}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def run_peer(script: Path, peer: str, dirs: list[str], threads: int) -> dict:
    cmd = [sys.executable, str(script), *dirs, "--threads", str(threads), "--child", peer]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(
            f"{peer}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no output'})",
            file=sys.stderr,
        )
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def pooled_peer(result: dict, words: dict[str, int]) -> dict:
    sets = {k: v for k, v in result.items() if k != "peak_rss_mb"}
    n_words = sum(words[k] for k in sets)
    audio = sum(v["audio_s"] for v in sets.values())
    return dict(
        wer=sum(v["wer"] * words[k] for k, v in sets.items()) / n_words,
        rtf_wall=sum(v["rtf_wall"] * v["audio_s"] for v in sets.values()) / audio,
        rtf_cpu=sum(v["rtf_cpu"] * v["audio_s"] for v in sets.values()) / audio,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR")
    ap.add_argument("--bundle", action="append", required=True, help="bundle directory (repeatable)")
    ap.add_argument("--peers", default="faster-whisper-int8,faster-whisper-float32,pocketsphinx")
    ap.add_argument("--peers-script", type=Path, default=DEFAULT_PEERS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--decode",
        action="append",
        metavar="NAME=ARGS",
        help="run every bundle also with these `edge-asr bench` options, e.g. 'litert=--backend tflite' "
        "or, for LSTM-CTC bundles, 'digits=--beam 8 --hotwords zero,one,two' (repeatable)",
    )
    ap.add_argument("--json", type=Path, help="also write all results to this file")
    args = ap.parse_args()

    variants = [("", [])] + [(d.split("=", 1)[0], d.split("=", 1)[1].split()) for d in args.decode or []]
    rows, raw = [], {}
    words = None
    for bundle in args.bundle:
        for variant, options in variants:
            r = run_ours(bundle, args.dirs, args.threads, args.runs, options)
            system = f"edge-asr {r['bundle']}" + (f" {variant}" if variant else "")
            raw[system] = r
            words = {k: v["words"] for k, v in r["sets"].items()}
            for label, s in r["sets"].items():
                rows.append((system, label, s["wer"], s["rtf_wall"], s["rtf_cpu"], r["peak_rss_mb"], r["bundle_mb"]))
            if len(r["sets"]) > 1:
                rows.append((system, "pooled", r["wer"], r["rtf_wall"], r["rtf_cpu"], r["peak_rss_mb"], r["bundle_mb"]))
    if not args.peers_script.exists():
        print(f"peers script not found at {args.peers_script}; showing ours only", file=sys.stderr)
        args.peers = ""
    for peer in filter(None, args.peers.split(",")):
        r = run_peer(args.peers_script, peer, args.dirs, args.threads)
        if not r:
            continue
        raw[peer] = r
        for label, s in r.items():
            if label != "peak_rss_mb":
                rows.append((peer, label, s["wer"], s["rtf_wall"], s["rtf_cpu"], r["peak_rss_mb"], None))
        if len(r) > 2:
            p = pooled_peer(r, words)
            rows.append((peer, "pooled", p["wer"], p["rtf_wall"], p["rtf_cpu"], r["peak_rss_mb"], None))

    print(
        f"{args.threads} threads; edge-asr RTF = median of {args.runs} runs; WER: Whisper EnglishTextNormalizer + jiwer"
    )
    width = max(28, *(len(r[0]) for r in rows))
    print(
        f"{'system':{width}s} {'set':16s} {'WER%':>7s} {'RTF wall':>9s} {'RTF cpu':>8s} {'peak MB':>8s} "
        f"{'model MB':>9s}"
    )
    for system, label, wer, rtf, cpu, rss, mb in rows:
        print(
            f"{system:{width}s} {label:16s} {wer:7.2f} {rtf:9.4f} {cpu:8.4f} {rss:8d} "
            f"{'' if mb is None else f'{mb:9.2f}'}"
        )
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
