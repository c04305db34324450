"""Getting an archive onto a device and running commands there: over ssh (scp, or rsync when both ends have
it) or adb (boards and phones with adbd and a Linux user land). Then the on-device benchmark: `edge-asr
bench --json` on the archive's test set, collected into one JSON report with the device's own description."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from edge_asr.errors import EdgeAsrError


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise EdgeAsrError(f"{tool} not found (install {package})")


class Ssh:
    def __init__(self, host: str, port: int | None = None, identity: str | None = None):
        _require("ssh", "openssh-client")
        self.host = host
        self.options = ["-o", "BatchMode=yes"]
        self.options += ["-p", str(port)] if port else []
        self.options += ["-i", identity] if identity else []
        self.name = host

    def run(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(["ssh", *self.options, self.host, command], capture_output=True, text=True)
        if check and out.returncode:
            raise EdgeAsrError(f"{self.host}: `{command}` failed: {_tail(out)}")
        return out

    def copy(self, local: Path, remote: str) -> None:
        """rsync (resumes a broken transfer over a flaky link) where both ends have it, else scp."""
        if shutil.which("rsync"):
            shell = shlex.join(["ssh", *self.options])
            out = subprocess.run(
                ["rsync", "--partial", "-e", shell, str(local), f"{self.host}:{remote}"], capture_output=True, text=True
            )
            if out.returncode == 0:
                return
        port = ["-P", self.options[self.options.index("-p") + 1]] if "-p" in self.options else []
        identity = ["-i", self.options[self.options.index("-i") + 1]] if "-i" in self.options else []
        out = subprocess.run(
            ["scp", "-o", "BatchMode=yes", *port, *identity, str(local), f"{self.host}:{remote}"],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise EdgeAsrError(f"copying {local.name} to {self.host} failed: {_tail(out)}")


class Adb:
    def __init__(self, serial: str | None = None):
        _require("adb", "adb (Android platform tools)")
        self.prefix = ["adb", *(["-s", serial] if serial else [])]
        self.name = serial or "adb device"

    def run(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        # adb shell does not pass the remote status through on old devices: echo it and read it back.
        out = subprocess.run([*self.prefix, "shell", f"{command}; echo __status=$?"], capture_output=True, text=True)
        status = out.stdout.rsplit("__status=", 1)
        code = int(status[1].strip()) if len(status) == 2 and status[1].strip().isdigit() else out.returncode or 1
        out = subprocess.CompletedProcess(out.args, code, status[0], out.stderr)
        if check and code:
            raise EdgeAsrError(f"{self.name}: `{command}` failed: {_tail(out)}")
        return out

    def copy(self, local: Path, remote: str) -> None:
        out = subprocess.run([*self.prefix, "push", str(local), remote], capture_output=True, text=True)
        if out.returncode:
            raise EdgeAsrError(f"adb push {local.name} failed: {_tail(out)}")


def _tail(out: subprocess.CompletedProcess) -> str:
    text = (out.stderr or out.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit status {out.returncode}"


def connect(spec: str):
    """ "ssh:user@host[:port]" or "user@host" (ssh), "adb" or "adb:SERIAL"."""
    if spec == "adb" or spec.startswith("adb:"):
        return Adb(spec[4:] or None)
    host = spec[4:] if spec.startswith("ssh:") else spec
    port = None
    if host.count(":") == 1:
        host, port_text = host.split(":")
        port = int(port_text)
    return Ssh(host, port)


def deploy(
    archive: Path,
    device,
    prefix: str = "/opt/edge-asr",
    staging: str = "/tmp",
    sudo: bool = False,
    service: bool = False,
) -> None:
    """Copy the archive, unpack it and run its install.sh on the device."""
    archive = Path(archive)
    name = archive.name.removesuffix(".tar.gz")
    remote = f"{staging}/{archive.name}"
    device.copy(archive, remote)
    install = f"{staging}/{name}/install.sh --prefix={shlex.quote(prefix)}" + (" --service" if service else "")
    device.run(f"cd {staging} && tar xzf {archive.name} && {'sudo ' if sudo else ''}{install}")


def device_bench(
    device, prefix: str = "/opt/edge-asr", backends: list[str] | None = None, runs: int = 3, threads: int | None = None
) -> dict:
    """`edge-asr bench` of the installed test set on each backend, and whether each text is the one the
    packaging machine got: the device report."""
    expected = json.loads(device.run(f"cat {prefix}/testset/expected.json").stdout)
    archive = json.loads(device.run(f"cat {prefix}/ARCHIVE.json").stdout)
    report = {
        "archive": archive["name"],
        "bundle": archive["bundle"],
        "collected": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backends": {},
    }
    for backend in backends or archive["backends"]:
        out = device.run(
            f"{prefix}/bin/edge-asr bench {prefix}/testset --json --hypotheses --bundle {prefix}/bundle "
            f"--backend {backend} --runs {runs}" + (f" --threads {threads}" if threads else "")
        )
        result = json.loads(out.stdout)
        hypotheses = next(iter(result["sets"].values())).pop("hypotheses")
        host = expected["texts"].get(backend, {})
        report["device"] = result.pop("device")
        result["same_text_as_packaging_machine"] = (
            f"{sum(host.get(u) == h for u, h in hypotheses.items())}/{len(hypotheses)}"
        )
        report["backends"][backend] = result
    return report
