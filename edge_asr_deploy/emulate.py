"""The deployable archive checked on an emulated device: a Debian root for the target's architecture
(debootstrap), run under qemu-user through proot (no binfmt registration, no privileges to run it). The
archive's install.sh installs it there as on a device, then the emulated runtime transcribes the archive's
test set on every backend, and each text must be exactly the one this machine got (testset/expected.json).
Timing under emulation means nothing; correctness is the point.

The emulated CPU is a real board's core (Cortex-A72, a Raspberry Pi 4, by default): with qemu 7.2's "max"
model, ONNX Runtime 1.31 dies silently on the first decoder step, and a device has no such CPU anyway.

Needs (Debian): debootstrap, qemu-user-static, proot; root once, to debootstrap the root folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Callable

from edge_asr.errors import EdgeAsrError
from edge_asr.metrics import normalize

from .targets import Target

DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"  # Python 3.11, as Raspberry Pi OS bookworm
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _require_tools(target: Target) -> None:
    tools = {"debootstrap": "debootstrap", "proot": "proot", target.qemu: "qemu-user-static"}
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if missing:
        raise EdgeAsrError(f"emulating {target.name} needs {', '.join(missing)}: apt install {' '.join(missing)}")


def emulated(
    rootfs: Path,
    target: Target,
    command: list[str],
    workdir: str = "/",
    env: dict[str, str] | None = None,
    cpu: str | None = None,
    binds: tuple[str, ...] = ("/dev", "/proc"),
) -> subprocess.CompletedProcess:
    """Run `command` inside `rootfs` on the emulated CPU (qemu's -cpu model, default the target's), with a
    clean environment and the host's `binds`."""
    variables = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8"} | (env or {})
    qemu = f"{target.qemu} -cpu {cpu or target.qemu_cpu}"
    # Not /sys: the host's CPU topology there crashes ARM CPU detection (cpuinfo, in onnxruntime) under qemu.
    cmd = [
        "proot",
        "-0",
        "-q",
        qemu,
        "-r",
        str(rootfs),
        *(a for b in binds for a in ("-b", b)),
        "-w",
        workdir,
        "/usr/bin/env",
        "-i",
        *(f"{k}={v}" for k, v in variables.items()),
        *command,
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def ensure_rootfs(
    rootfs: Path, target: Target, mirror: str = DEBIAN_MIRROR, step: Callable[[str], None] = lambda m: None
) -> Path:
    """A minimal Debian root for the target with python3 and venv, made once (about 230 MB)."""
    _require_tools(target)
    rootfs = Path(rootfs)
    if (rootfs / "usr/bin/python3").exists() and not (rootfs / "debootstrap").exists():
        return rootfs
    if os.geteuid() != 0:
        raise EdgeAsrError(
            f"making the {target.debian_arch} root in {rootfs} needs root once (debootstrap); "
            "run this command with sudo, or pass --rootfs of one made before"
        )
    rootfs.mkdir(parents=True, exist_ok=True)
    if not (rootfs / "debootstrap").exists():
        step(f"debootstrap {SUITE} {target.debian_arch} (first stage) into {rootfs}")
        out = subprocess.run(
            [
                "debootstrap",
                f"--arch={target.debian_arch}",
                "--foreign",
                "--variant=minbase",
                "--include=python3,python3-venv",
                SUITE,
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise EdgeAsrError(f"debootstrap failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
    step("debootstrap second stage, emulated (a few minutes)")
    # No binds yet: the half-made root has no /proc or /dev to bind onto.
    out = emulated(
        rootfs,
        target,
        ["/debootstrap/debootstrap", "--second-stage"],
        env={"DEBOOTSTRAP_DIR": "/debootstrap"},
        binds=(),
    )
    if out.returncode:
        raise EdgeAsrError(f"debootstrap second stage failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
    return rootfs


def check_archive(
    archive: Path, rootfs: Path, target: Target, cpu: str | None = None, step: Callable[[str], None] = lambda m: None
) -> dict:
    """Install `archive` in the emulated root and transcribe its test set on each of its backends; returns
    {"machine", "install", "backends": {backend: {"same": n, "n": N, "mismatches": [...]}}}."""
    archive = Path(archive)
    name = archive.name.removesuffix(".tar.gz")
    staging = Path(rootfs) / "tmp" / "edge-asr-check"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        # The "data" filter (no absolute paths, links out of the folder or device files) where Python has it.
        tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    info = json.loads((staging / name / "ARCHIVE.json").read_text())
    if info["target"] != target.name:
        raise EdgeAsrError(f"{archive.name} is for {info['target']}, not {target.name}")
    cpu = cpu or target.qemu_cpu
    machine = emulated(rootfs, target, ["uname", "-m"], cpu=cpu).stdout.strip()
    step(f"install.sh on emulated {machine} ({cpu})")
    out = emulated(rootfs, target, [f"/tmp/edge-asr-check/{name}/install.sh", "--prefix=/opt/edge-asr"], cpu=cpu)
    if out.returncode:
        raise EdgeAsrError(f"install.sh failed under emulation: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
    expected = json.loads((staging / name / "testset" / "expected.json").read_text())
    wavs = sorted(p.name for p in (staging / name / "testset").glob("*.wav"))
    report = {
        "archive": info["name"],
        "machine": machine,
        "cpu": cpu,
        "expected_from": expected["machine"],
        "backends": {},
    }
    for backend in info["backends"]:
        step(f"transcribe {len(wavs)} files on {backend}, emulated")
        out = emulated(
            rootfs,
            target,
            [
                "/opt/edge-asr/bin/edge-asr",
                "transcribe",
                "--json",
                "--bundle",
                "/opt/edge-asr/bundle",
                "--backend",
                backend,
                *(f"/opt/edge-asr/testset/{w}" for w in wavs),
            ],
            cpu=cpu,
        )
        got = {Path(r["file"]).stem: r["text"] for r in map(json.loads, out.stdout.splitlines())}
        if out.returncode or len(got) != len(wavs):  # proot does not always pass a crash's status on
            last = (out.stderr or out.stdout or "no output").strip().splitlines()[-1]
            raise EdgeAsrError(
                f"edge-asr transcribe ({backend}) under emulation gave {len(got)} of {len(wavs)} transcripts: {last}"
            )
        want = expected["texts"][backend]
        mismatches = [{"id": u, "expected": t, "emulated": got.get(u)} for u, t in want.items() if got.get(u) != t]
        # Also after WER's normalization: a flipped near-tie in casing or punctuation counts there as no error.
        same_words = sum(normalize(t) == normalize(got.get(u) or "") for u, t in want.items())
        report["backends"][backend] = {
            "same": len(want) - len(mismatches),
            "same_normalized": same_words,
            "n": len(want),
            "texts": got,
            "mismatches": mismatches,
        }
    return report
