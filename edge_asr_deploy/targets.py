"""Deployment targets: which wheels a device needs, which backends it can run, how to emulate it here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    machine: str  # platform.machine() on the device, for dependency markers
    platforms: tuple[str, ...]  # pip --platform tags, newest first
    backends: tuple[str, ...]  # what the archive's bundle must carry, in order of preference
    debian_arch: str  # for an emulated root (debootstrap --arch)
    qemu: str | None  # qemu-user binary that runs it here
    qemu_cpu: str | None = None  # the CPU it emulates: a real board's core, not qemu's "max" (see emulate.py)


def _manylinux(machine: str, glibc: tuple[int, ...]) -> tuple[str, ...]:
    tags = tuple(f"manylinux_2_{minor}_{machine}" for minor in glibc)
    return tags + (f"manylinux2014_{machine}", f"linux_{machine}")


TARGETS = {
    # Raspberry Pi OS 64-bit and Debian/Ubuntu arm64 (bookworm: glibc 2.36), Android boards with a Linux user land.
    "linux-aarch64": Target(
        "linux-aarch64",
        "aarch64",
        _manylinux("aarch64", (36, 35, 34, 31, 28, 27, 26, 17)),
        ("onnx", "tflite"),
        "arm64",
        "qemu-aarch64-static",
        "cortex-a72",
    ),  # Raspberry Pi 4
    # 32-bit Raspberry Pi OS. ONNX Runtime publishes no armv7 wheel, so LiteRT (tflite-runtime) only; PyPI has
    # no armv7 numpy either: add --extra-index-url https://www.piwheels.org/simple.
    "linux-armv7": Target(
        "linux-armv7",
        "armv7l",
        _manylinux("armv7l", (36, 35, 34, 31, 28, 17)),
        ("tflite",),
        "armhf",
        "qemu-arm-static",
        "cortex-a7",
    ),  # Raspberry Pi 2 / Zero 2 in 32-bit
    "linux-x86_64": Target(
        "linux-x86_64",
        "x86_64",
        _manylinux("x86_64", (36, 35, 34, 31, 28, 27, 26, 17)),
        ("onnx", "tflite"),
        "amd64",
        None,
    ),
}


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}") from None
