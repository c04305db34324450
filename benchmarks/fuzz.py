#!/usr/bin/env python3
"""Fuzz every input the runtime takes from a user or a file, for minutes per target, and report the inputs
tried and the failures found.

The targets and their properties are tests/fuzz_targets.py's (one line and the module's error, or a valid
result; never another exception, a console warning, a call past 5 s, or a file opened outside a bundle):

  audio     any bytes as an audio file (every format libsndfile opens)
  manifest  any bytes as a bundle's manifest.json
  graph     any bytes as a bundle's ONNX graph, its checksum recorded
  config    any bytes as the daemon's TOML configuration
  text      any bytes as a hotwords file, a prompt and a grammar (the default bundle's tokenizer)
  spool     any bytes as the daemon's JSONL log and offset file, read as the MQTT publisher reads them
  status    any bytes sent to the daemon's HTTP status endpoint
  nospeech  any bytes as the recipe of a signal without speech (noise, hum, tones, clicks, constants, the
            bytes as samples; -70 dBFS to past full scale), transcribed by the default bundle: no text

Each target runs in a process of its own: with atheris (coverage-guided libFuzzer over the Python code,
starting from the targets' seeds and a dictionary of parser tokens) where it is installed, with hypothesis
otherwise. A failure ends that target's run (libFuzzer's way) and is saved under --out with its input.

  python benchmarks/fuzz.py --minutes 10 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(ROOT), str(TESTS)]  # this checkout's code, not an installed copy
TARGETS = ("audio", "manifest", "graph", "config", "text", "spool", "status", "nospeech")


def target_function(name: str, work: Path):
    """(seeds, function of bytes) for target `name`, with what it needs made under `work`."""
    import fuzz_targets as t

    if name == "audio":
        return t.audio_seeds(), t.audio_file
    if name in ("manifest", "graph"):
        bundle = t.make_bundle(work / "bundle")
        if name == "manifest":
            return t.manifest_seeds(bundle), lambda data: t.manifest_file(data, bundle)
        return t.graph_seeds(bundle), lambda data: t.graph_file(data, bundle)
    if name == "config":
        return t.config_seeds(), lambda data: t.config_file(data, work)
    if name == "text":
        from edge_asr.bundle import Bundle
        from edge_asr.paths import bundle_dir

        tokenizer = Bundle.load(bundle_dir()).tokenizer
        return t.text_seeds(), lambda data: t.user_text(data, tokenizer)
    if name == "spool":
        return t.spool_seeds(), lambda data: t.spool_log(data, work)
    if name == "nospeech":
        import edge_asr
        from edge_asr.paths import bundle_dir

        recognizer = edge_asr.load(bundle_dir(), threads=1)  # one core per target: two run at once
        return [bytes([k]) * 40 for k in range(9)], lambda data: t.no_speech(data, recognizer)
    if name == "status":
        server = t.StatusServer.start()
        return t.http_seeds(), lambda data: t.status_request(data, server)
    raise SystemExit(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")


def run_atheris(name: str, seconds: int, out: Path) -> None:
    """libFuzzer on one target until `seconds` pass or it fails; its statistics go to stderr."""
    import atheris

    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    seeds, function = target_function(name, work)
    corpus = out / f"{name}-corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    import fuzz_targets as t

    dictionary = out / "tokens.dict"
    dictionary.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in t.DICTIONARY))
    atheris.instrument_all()
    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=4096",
            f"-dict={dictionary}", "-print_final_stats=1", f"-artifact_prefix={out}/{name}-",
            "-max_len=65536"]  # fmt: skip
    atheris.Setup(argv, function)
    atheris.Fuzz()


def run_hypothesis(name: str, seconds: int, out: Path) -> None:
    """Hypothesis on one target until `seconds` pass or it fails; prints the inputs tried as libFuzzer does."""
    from hypothesis import HealthCheck, given, settings
    from test_fuzz import inputs

    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    seeds, function = target_function(name, work)
    tried = 0
    end = time.monotonic() + seconds

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=inputs(seeds, 8192))
    def run(data):
        nonlocal tried
        tried += 1
        try:
            function(data)
        except AssertionError:
            (out / f"{name}-crash-{tried}").write_bytes(data)
            raise

    try:
        while time.monotonic() < end:
            run()
    finally:
        print(f"stat::number_of_executed_units: {tried}", file=sys.stderr)


def fuzz_one(name: str, seconds: int, engine: str, out: Path) -> dict:
    """One target in its own process; its inputs tried and its failure, if any."""
    command = [sys.executable, __file__, "--worker", name, "--seconds", str(seconds), "--engine", engine,
               "--out", str(out)]  # fmt: skip
    start = time.monotonic()
    log_path = out / f"{name}.log"
    with open(log_path, "wb") as log_file:  # not held here: a child forked from a large parent inherits its peak RSS
        run = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, timeout=seconds + 600)
    with open(log_path, "rb") as log_file:
        log_file.seek(max(0, log_file.seek(0, 2) - (1 << 20)))  # libFuzzer's statistics are at the end
        log = log_file.read().decode("utf-8", errors="replace")
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    failure = re.search(r"(FuzzFailure: .*|ERROR: libFuzzer: .*|Uncaught Python exception: ===\n.*)", log)
    return {
        "target": name,
        "engine": engine,
        "seconds": round(time.monotonic() - start),
        "inputs": int(executed[-1]) if executed else None,
        "failures": 0 if run.returncode == 0 else 1,
        "first failure": failure.group(1).split("\n")[-1][:200]
        if failure
        else (None if run.returncode == 0 else log[-200:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="per target (default 10)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated (default: {','.join(TARGETS)})")
    parser.add_argument("--jobs", type=int, default=2, help="targets fuzzed at once (default 2: one per core)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--out", default="fuzz-out", help="corpora, logs and failing inputs (default fuzz-out/)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if args.worker:
        (run_atheris if engine == "atheris" else run_hypothesis)(args.worker, args.seconds, out)
        return 0
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    seconds = round(args.minutes * 60)
    print(f"fuzzing {len(names)} targets for {seconds} s each with {engine}, {args.jobs} at a time", file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: fuzz_one(n, seconds, engine, out), names))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"{'target':<10} {'engine':<10} {'seconds':>7} {'inputs':>9} {'inputs/s':>9} {'failures':>8}  first failure"
        )
        for r in results:
            rate = f"{r['inputs'] / r['seconds']:.0f}" if r["inputs"] and r["seconds"] else "-"
            print(f"{r['target']:<10} {r['engine']:<10} {r['seconds']:>7} {r['inputs'] or '-':>9} {rate:>9} "
                  f"{r['failures']:>8}  {r['first failure'] or ''}")  # fmt: skip
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
