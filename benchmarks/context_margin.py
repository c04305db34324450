#!/usr/bin/env python3
"""Choose a dynamic-context bundle's margin and floor: WER and RTF of the same model under several policies.

Run it on held-out sets only (synthesized voices and sentences the adaptation never used, recorded speakers
it never heard; `edge-asr adapt` keeps such sets), never on the evaluation sets: the policy chosen here is
what the bundle's manifest then records.

  python benchmarks/context_margin.py --bundle BUNDLE --margins 0,0.25,0.5,1 --floors 1 DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import dataclasses

from edge_asr.bench import run_bench
from edge_asr.context import ContextPolicy
from edge_asr.transcriber import Transcriber


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--margins", default="0,0.25,0.5,1")
    ap.add_argument("--floors", default="1")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also the 30 s window on the same model")
    args = ap.parse_args()

    transcriber = Transcriber(args.bundle, args.threads, backend=args.backend)
    base = transcriber.context
    policies = [
        dataclasses.replace(base, margin_s=float(m), floor_s=float(f))
        for f in args.floors.split(",")
        for m in args.margins.split(",")
    ]
    if args.full:
        policies.append(ContextPolicy.full())
    print(f"{'policy':58s} " + " ".join(f"{s[-14:]:>14s}" for s in args.dirs) + f" {'pooled WER':>10s} {'RTF':>7s}")
    for policy in policies:
        transcriber.context = policy
        r = run_bench(transcriber, args.dirs, runs=1)
        per_set = " ".join(f"{s['wer']:14.2f}" for s in r["sets"].values())
        print(f"{policy.describe()[:58]:58s} {per_set} {r['wer']:10.2f} {r['rtf_wall']:7.4f}", flush=True)


if __name__ == "__main__":
    main()
