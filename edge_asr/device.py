"""What machine a benchmark ran on, for reports collected from devices: board or phone model, CPU, cores,
OS, Python and the inference runtimes' versions. Every field is read from the system; None where it
does not say."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

# ARM's CPU part numbers (/proc/cpuinfo "CPU part") of the cores on common boards and phones.
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd4d": "Cortex-A715",
    "0xc07": "Cortex-A7",
    "0xc0f": "Cortex-A15",
}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00 \n") or None
    except OSError:
        return None


def _getprop(name: str) -> str | None:
    """An Android system property (Termux and adb shells have `getprop`)."""
    try:
        out = subprocess.run(["getprop", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_model() -> str | None:
    return (
        _read("/proc/device-tree/model")
        or _read("/sys/firmware/devicetree/base/model")
        or _getprop("ro.product.model")
        or _read("/sys/class/dmi/id/product_name")
    )


def cpu_model() -> str | None:
    info = _read("/proc/cpuinfo") or ""
    fields: dict[str, list[str]] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), []).append(value.strip())
    if "model name" in fields and not fields["model name"][0].startswith("ARMv"):
        return fields["model name"][0]
    parts = sorted({ARM_PARTS.get(p, f"ARM part {p}") for p in fields.get("CPU part", [])})
    if parts:
        return " + ".join(parts)
    return platform.processor() or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info() -> dict:
    return {
        "model": device_model(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "android": _getprop("ro.build.version.release"),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        "litert": _version("ai-edge-litert") or _version("tflite-runtime"),
    }
