"""A self-contained deployable archive for one target: everything a device needs, installable offline.

edge-asr-<version>-<bundle>-<target>/
  install.sh            venv under $PREFIX (default /opt/edge-asr) from the wheels here, no network
  requirements.txt      the runtime's dependencies for this target (markers evaluated for the device)
  wheels/               edge_asr and those dependencies, built for the target's CPU and Python
  bundle/               the bundle, with only the model formats the target runs
  testset/              synthesized utterances + refs.tsv, and expected.json: the text this machine
                        gets for each of them on each backend, which a device must reproduce
  config/edge-asr.toml  daemon configuration;  systemd/edge-asr.service  its unit
  systemd/edge-asr-wyoming.service  the Wyoming server's unit (Home Assistant)
  ARCHIVE.json          target, Python, bundle, backends, and the sha256 of every file
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from edge_asr.bundle import Bundle
from edge_asr.errors import EdgeAsrError
from edge_asr.manifest import Manifest, sha256_file, write_manifest

from .targets import Target

HERE = Path(__file__).resolve().parent
# LiteRT where ONNX Runtime has no wheel; paho-mqtt for [mqtt]; wyoming for `edge-asr wyoming`
RUNTIME_EXTRAS = ("tflite", "mqtt", "wyoming")


def project_root(source: Path | None) -> Path:
    """The source checkout the runtime wheel is built from."""
    root = Path(source) if source else HERE.parent
    if not (root / "pyproject.toml").exists() or not (root / "edge_asr").is_dir():
        raise EdgeAsrError(f"{root}: not an edge-asr source checkout (pass --source DIR)")
    return root


# What the device wheel leaves out of pyproject.toml: the workstation's commands and packages.
_WORKSTATION_SCRIPTS = re.compile(r"^edge-asr-(build|deploy|firmware) = .*\n", re.M)
_COMMANDS_GROUP = re.compile(r'^\[project\.entry-points\."edge_asr\.commands"\]\n(?:[^\[\n].*\n|\n)*', re.M)
_WHEEL_PACKAGES = re.compile(r"^packages = \[.*\]$", re.M)


def runtime_project(root: Path, staged: Path) -> Path:
    """A copy of the project with the runtime alone (`edge_asr`, its dependencies and extras): what a device
    installs, without the build step, the deployment tools or the deltas they ship."""
    staged.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "edge_asr", staged / "edge_asr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "README.md", staged / "README.md")
    project = (root / "pyproject.toml").read_text(encoding="utf-8")
    project = _COMMANDS_GROUP.sub("", _WORKSTATION_SCRIPTS.sub("", project))
    project, found = _WHEEL_PACKAGES.subn('packages = ["edge_asr"]', project)
    if found != 1:
        raise EdgeAsrError(f"{root / 'pyproject.toml'}: cannot find the wheel's package list")
    (staged / "pyproject.toml").write_text(project, encoding="utf-8")
    return staged


def build_wheel(root: Path, dist: Path) -> Path:
    """The runtime's wheel (`edge_asr` alone) from the source checkout `root`."""
    with tempfile.TemporaryDirectory() as tmp:
        return _pip_wheel(runtime_project(root, Path(tmp) / "edge-asr"), dist)


def _pip_wheel(root: Path, dist: Path) -> Path:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            str(dist),
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(dist.glob("edge_asr-*.whl"))
    if out.returncode or not wheels:
        raise EdgeAsrError(f"building the edge-asr wheel failed: {_last_line(out.stderr)}")
    return wheels[-1]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1] if lines else "no output"


def target_requirements(wheel: Path, target: Target, python: str, extras=RUNTIME_EXTRAS) -> list[str]:
    """The wheel's Requires-Dist for `extras`, with environment markers evaluated for the device (pip would
    evaluate them for this machine)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode().splitlines()
    env = {
        "platform_machine": target.machine,
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    requirements = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None:
            requirements.append(str(req))
            continue
        if req.marker.evaluate(env | {"extra": ""}) or any(req.marker.evaluate(env | {"extra": e}) for e in extras):
            req.marker = None
            requirements.append(str(req))
    return sorted(set(requirements))


def download_wheels(
    requirements: list[str], target: Target, python: str, dest: Path, index_urls: tuple[str, ...] = ()
) -> None:
    """Binary wheels of `requirements` for the target; one line naming what has none."""
    abi = "cp" + python.replace(".", "")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
        "-d",
        str(dest),
    ]
    for tag in target.platforms:
        cmd += ["--platform", tag]
    for url in index_urls:
        cmd += ["--extra-index-url", url]
    out = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if out.returncode:
        missing = re.findall(r"No matching distribution found for (\S+)", out.stderr)
        hint = (
            " (for armv7 add --extra-index-url https://www.piwheels.org/simple)" if target.machine == "armv7l" else ""
        )
        what = (
            f"no {target.name} wheel for Python {python} of {', '.join(missing)}" if missing else _last_line(out.stderr)
        )
        raise EdgeAsrError(what + hint)


def slim_bundle(source: Path | Bundle, dest: Path, formats: list[str]) -> Manifest:
    """Copy the bundle (a folder, or one loaded and verified already) with only `formats`, its manifest
    rewritten to list just those files."""
    bundle = source if isinstance(source, Bundle) else Bundle.load(source)
    manifest = json.loads(json.dumps(bundle.manifest.raw))
    dropped = set()
    for fmt in [f for f in bundle.formats if f not in formats]:
        dropped |= bundle.manifest.model.files(fmt)
        if fmt == "onnx":
            manifest["model"]["graphs"] = {}
            manifest["model"].pop("graph_data", None)
        else:
            del manifest["model"][fmt]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in dropped}
    manifest["deployed_formats"] = formats
    dest.mkdir(parents=True)
    for name in manifest["files"]:
        shutil.copy2(bundle.path / name, dest / name)
    return write_manifest(dest, manifest)


def copy_testset(folder: Path, dest: Path) -> list[tuple[str, Path]]:
    dest.mkdir(parents=True)
    rows = [line.split("\t", 1) for line in (folder / "refs.tsv").read_text(encoding="utf-8").splitlines() if line]
    items = []
    for uid, _ in rows:
        audio = next(folder.glob(f"{uid}.*"))
        shutil.copy2(audio, dest / audio.name)
        items.append((uid, dest / audio.name))
    shutil.copy2(folder / "refs.tsv", dest / "refs.tsv")
    return items


def expected_texts(bundle: Bundle, items: list[tuple[str, Path]], backends: list[str], threads: int) -> dict:
    """What this machine transcribes, per backend: the texts a device must reproduce."""
    import edge_asr
    from edge_asr.audio import load_audio

    texts = {}
    for backend in backends:
        transcriber = edge_asr.load(bundle, threads, backend=backend)
        texts[backend] = {uid: transcriber.transcribe(load_audio(path)).text for uid, path in items}
    return {"machine": platform.machine(), "platform": platform.platform(), "texts": texts}


def _render(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def device_config(backend: str) -> str:
    """The daemon configuration with the installed bundle and the target's backend; install.sh puts in the
    install prefix for @PREFIX@."""
    text = (HERE / "edge-asr.toml").read_text()
    text = re.sub(r"(?m)^# bundle = .*$", 'bundle = "@PREFIX@/bundle"', text)
    return re.sub(r'(?m)^backend = "auto"', f'backend = "{backend}"', text)


def build_archive(
    bundle: Path,
    target: Target,
    out_dir: Path,
    python: str = "3.11",
    testset: Path | None = None,
    count: int = 10,
    source: Path | None = None,
    index_urls: tuple[str, ...] = (),
    threads: int | None = None,
    step: Callable[[str], None] = lambda m: None,
) -> Path:
    """Write edge-asr-<version>-<bundle>-<target>.tar.gz into `out_dir`; returns its path."""
    from edge_asr import __version__

    source_bundle = Bundle.load(bundle)
    formats = [f for f in target.backends if f in source_bundle.formats]
    if not formats:
        raise EdgeAsrError(
            f"{bundle}: {target.name} runs {' or '.join(target.backends)} models and this bundle has "
            f"none; rebuild it with --formats {','.join(target.backends)}"
        )
    root_name = f"edge-asr-{__version__}-{source_bundle.manifest.name}-{target.name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / root_name
        (root / "wheels").mkdir(parents=True)
        step("build the runtime wheel")
        wheel = build_wheel(project_root(source), Path(tmp) / "dist")
        requirements = target_requirements(wheel, target, python)
        step(f"download {len(requirements)} dependencies' wheels for {target.name}, Python {python}")
        download_wheels(requirements, target, python, root / "wheels", index_urls)
        shutil.copy2(wheel, root / "wheels" / wheel.name)
        (root / "requirements.txt").write_text("\n".join(requirements) + "\n")
        step(f"copy the bundle ({', '.join(formats)})")
        manifest = slim_bundle(source_bundle, root / "bundle", formats)
        step("copy the test set")
        if testset is None:
            from edge_asr_build.speech.synth import synthetic_set

            testset = synthetic_set(count, seed=21)
        items = copy_testset(Path(testset), root / "testset")
        step(f"transcribe the test set here ({', '.join(formats)})")
        expected = expected_texts(Bundle.load(root / "bundle"), items, formats, threads)
        (root / "testset" / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
        (root / "config").mkdir()
        (root / "config" / "edge-asr.toml").write_text(device_config(formats[0]))
        (root / "systemd").mkdir()
        for unit in ("edge-asr.service", "edge-asr-wyoming.service"):
            shutil.copy2(HERE / unit, root / "systemd" / unit)
        install = root / "install.sh"
        install.write_text(_render((HERE / "install.sh").read_text(), PYTHON_VERSION=python, TARGET=target.name))
        install.chmod(0o755)
        files = {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
        info = {
            "name": root_name,
            "target": target.name,
            "machine": target.machine,
            "python": python,
            "edge_asr": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bundle": manifest.name,
            "backends": formats,
            "testset": len(items),
            "files": files,
        }
        (root / "ARCHIVE.json").write_text(json.dumps(info, indent=2) + "\n")
        step("write the archive")
        archive = out_dir / f"{root_name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(root, arcname=root_name)
    return archive
