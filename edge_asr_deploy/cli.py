"""`edge-asr-deploy`: package a bundle for a device, deploy it, benchmark it there, check it emulated.

package BUNDLE --target linux-aarch64      self-contained archive (wheels, bundle, test set, unit, install.sh)
android BUNDLE --out DIR                   asset pack for an app (see edge_asr_deploy/ANDROID.md)
deploy ARCHIVE DEVICE                      copy and install over ssh (user@host) or adb
bench DEVICE                               on-device WER / RTF / peak RSS report as JSON
emulate ARCHIVE                            install and transcribe under qemu-user in a Debian root
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_asr.errors import EdgeAsrError
from edge_asr.paths import home

from .targets import TARGETS, target


def _step(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def cmd_package(args) -> int:
    from .package import build_archive

    archive = build_archive(
        Path(args.bundle),
        target(args.target),
        Path(args.out),
        args.python,
        Path(args.testset) if args.testset else None,
        args.count,
        Path(args.source) if args.source else None,
        tuple(args.extra_index_url or ()),
        args.threads,
        step=_step,
    )
    print(f"{archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_android(args) -> int:
    from .android import asset_pack

    out = asset_pack(Path(args.bundle), Path(args.out), args.format)
    print(out)
    return 0


def cmd_deploy(args) -> int:
    from .remote import connect, deploy

    deploy(Path(args.archive), connect(args.device), args.prefix, args.staging, args.sudo, args.service)
    print(f"installed on {args.device} in {args.prefix}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .remote import connect, device_bench

    report = device_bench(connect(args.device), args.prefix, args.backend and [args.backend], args.runs, args.threads)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    d = report["device"]
    for backend, r in report["backends"].items():
        print(
            f"{d['model'] or d['machine']} ({d['cpu']}, {d['cores']} cores) {backend}: WER {r['wer']:.2f}%, "
            f"RTF {r['rtf_wall']:.3f} wall / {r['rtf_cpu']:.3f} CPU, peak RSS {r['peak_rss_mb']} MB, "
            f"same text as the packaging machine {r['same_text_as_packaging_machine']}",
            file=sys.stderr,
        )
    return 0


def cmd_emulate(args) -> int:
    from .emulate import check_archive, ensure_rootfs

    t = target(args.target)
    if t.qemu is None:
        raise EdgeAsrError(f"{t.name} runs natively here; nothing to emulate")
    rootfs = ensure_rootfs(Path(args.rootfs or home() / "rootfs" / f"debian-{t.debian_arch}"), t, step=_step)
    report = check_archive(Path(args.archive), rootfs, t, args.cpu, step=_step)
    if args.json:
        print(json.dumps(report, indent=2))
    ok = True
    for backend, r in report["backends"].items():
        ok &= not r["mismatches"]
        print(
            f"{report['machine']} (emulated {report['cpu']}) {backend}: {r['same']}/{r['n']} transcripts identical to "
            f"{report['expected_from']}'s, {r['same_normalized']}/{r['n']} after WER normalization"
        )
        for m in r["mismatches"]:
            print(f"  {m['id']}: {report['expected_from']} {m['expected']!r} / emulated {m['emulated']!r}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-asr-deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("package", help="a self-contained deployable archive for one target")
    p.add_argument("bundle", help="bundle directory (built with --formats onnx,tflite for every backend)")
    p.add_argument("--target", choices=list(TARGETS), default="linux-aarch64")
    p.add_argument(
        "--python", default="3.11", help="the device's Python (default 3.11: Debian / Raspberry Pi OS bookworm)"
    )
    p.add_argument("--out", default="dist", help="output folder (default dist/)")
    p.add_argument("--testset", help="folder with refs.tsv to ship (default: synthesized sentences)")
    p.add_argument("--count", type=int, default=10, help="synthesized test sentences (default 10)")
    p.add_argument("--source", help="edge-asr source checkout the runtime wheel is built from (default: this one)")
    p.add_argument("--extra-index-url", action="append", help="another wheel index (armv7: piwheels)")
    p.add_argument("--threads", type=int, help="CPU threads (default: $EDGE_ASR_THREADS, else 2)")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("android", help="an asset pack for an Android app")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="the app's assets folder, e.g. app/src/main/assets")
    p.add_argument(
        "--format",
        choices=["ort", "tflite"],
        default="ort",
        help="ort: ONNX Runtime (onnxruntime-android); tflite: LiteRT (default ort)",
    )
    p.set_defaults(func=cmd_android)

    p = sub.add_parser("deploy", help="copy an archive to a device and install it")
    p.add_argument("archive")
    p.add_argument("device", help="user@host[:port] (ssh), adb or adb:SERIAL")
    p.add_argument("--prefix", default="/opt/edge-asr")
    p.add_argument("--staging", default="/tmp", help="where the archive is unpacked on the device")
    p.add_argument("--sudo", action="store_true", help="run install.sh with sudo")
    p.add_argument("--service", action="store_true", help="also install and start the daemon (implies root)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("bench", help="benchmark the installed archive on the device; JSON report")
    p.add_argument("device", help="user@host[:port] (ssh), adb or adb:SERIAL")
    p.add_argument("--prefix", default="/opt/edge-asr")
    p.add_argument("--backend", help="one backend (default: every backend the archive carries)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (default: $EDGE_ASR_THREADS, else 2)")
    p.add_argument("--out", help="also write the report here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("emulate", help="install an archive in an emulated Debian root and check its transcripts")
    p.add_argument("archive")
    p.add_argument("--target", choices=[n for n, t in TARGETS.items() if t.qemu], default="linux-aarch64")
    p.add_argument("--rootfs", help="Debian root folder (default: $EDGE_ASR_HOME/rootfs/debian-ARCH, made once)")
    p.add_argument(
        "--cpu",
        help="qemu CPU model (default: the target's, cortex-a72 for aarch64 as in a Raspberry "
        "Pi 4; cortex-a76 for a Pi 5)",
    )
    p.add_argument("--json", action="store_true", help="print the whole report, every transcript included")
    p.set_defaults(func=cmd_emulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EdgeAsrError, ValueError) as e:
        print(f"edge-asr-deploy: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
