"""Packaging for devices: the archive installs offline and reproduces this machine's transcripts, markers
are evaluated for the target, the Android asset pack describes what an app must feed its models."""

import json
import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import edge_asr
from edge_asr.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    from edge_asr_deploy.package import build_wheel

    return build_wheel(ROOT, tmp_path_factory.mktemp("dist"))


def test_dependencies_are_chosen_for_the_target_not_this_machine(wheel):
    from edge_asr_deploy.package import target_requirements
    from edge_asr_deploy.targets import target

    names = lambda reqs: {r.split(">")[0].split("=")[0].split("<")[0] for r in reqs}  # noqa: E731
    arm64 = names(target_requirements(wheel, target("linux-aarch64"), "3.11"))
    armv7 = names(target_requirements(wheel, target("linux-armv7"), "3.11"))
    assert {"numpy", "onnxruntime", "ai-edge-litert", "soxr", "soundfile", "paho-mqtt", "wyoming"} <= arm64
    assert "tflite-runtime" not in arm64
    assert "onnxruntime" not in armv7 and "ai-edge-litert" not in armv7 and "tflite-runtime" in armv7
    assert "torch" not in arm64 | armv7  # the build step's dependencies never reach a device


def test_the_device_wheel_carries_the_runtime_alone(wheel):
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"edge_asr"}
    assert "edge_asr/cli.py" in names and not any(n.endswith(".safetensors") for n in names)  # no deltas
    assert "edge-asr = edge_asr.cli:main" in entry_points and "edge_asr_build" not in entry_points


def test_archive_installs_offline_and_reproduces_this_machines_texts(bundle_int8, speech, tmp_path):
    from edge_asr_build.speech.synth import write_wav
    from edge_asr_deploy.package import build_archive
    from edge_asr_deploy.targets import target

    testset = tmp_path / "testset"
    testset.mkdir()
    rows = []
    for i, (text, audio) in enumerate(speech[:2]):
        write_wav(testset / f"s{i}.wav", audio)
        rows.append(f"s{i}\t{text}")
    (testset / "refs.tsv").write_text("\n".join(rows) + "\n")
    python = "%d.%d" % sys.version_info[:2]
    archive = build_archive(bundle_int8, target("linux-x86_64"), tmp_path / "dist", python, testset, source=ROOT)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / archive.name.removesuffix(".tar.gz")
    info = json.loads((root / "ARCHIVE.json").read_text())
    assert info["backends"] == ["onnx", "tflite"] and info["target"] == "linux-x86_64"
    assert not any(p.name.endswith(".ort") for p in (root / "bundle").iterdir())  # only what the target runs
    prefix = tmp_path / "opt"
    env = dict(os.environ, PYTHON=sys.executable, PIP_NO_INDEX="1")
    install = subprocess.run([str(root / "install.sh"), f"--prefix={prefix}"], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stderr
    assert f'bundle = "{prefix}/bundle"' in (prefix / "config" / "edge-asr.toml").read_text()
    expected = json.loads((root / "testset" / "expected.json").read_text())
    for backend in ("onnx", "tflite"):
        run = subprocess.run(
            [
                str(prefix / "bin" / "edge-asr"),
                "transcribe",
                "--json",
                "--backend",
                backend,
                "--bundle",
                str(prefix / "bundle"),
                *map(str, sorted((prefix / "testset").glob("*.wav"))),
            ],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        got = {Path(r["file"]).stem: r["text"] for r in map(json.loads, run.stdout.splitlines())}
        assert got == expected["texts"][backend]
    # The installed venv has the runtime only.
    listed = subprocess.run(
        [str(prefix / "venv" / "bin" / "python"), "-m", "pip", "list"], capture_output=True, text=True
    )
    assert "onnxruntime" in listed.stdout and "wyoming" in listed.stdout and "torch" not in listed.stdout
    assert (root / "systemd" / "edge-asr-wyoming.service").is_file()
    wrong = subprocess.run([str(root / "install.sh"), "--bogus"], capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1


def test_android_asset_pack_describes_its_graphs(bundle_int8, speech, tmp_path):
    from edge_asr_deploy.android import asset_pack

    for fmt in ("ort", "tflite"):
        out = asset_pack(bundle_int8, tmp_path / "assets", fmt)
        contract = json.loads((out / "contract.json").read_text())
        bundle = Bundle.load(out)  # every file it keeps is listed with its sha256
        assert bundle.formats == [fmt]
        assert not (out / "decoder.int8.rows.bin").exists()  # the .onnx graph's rows go with it
        filters = np.fromfile(out / contract["frontend"]["mel_filters"]["file"], "<f4")
        assert filters.size == np.prod(contract["frontend"]["mel_filters"]["shape"]) == 80 * 201
        assert contract["decoder"]["prompt"] == [50257, 50362]
        graphs = contract["graphs"]
        assert set(graphs) == {"encoder", "decoder"}
        if fmt == "ort":
            assert graphs["encoder"]["inputs"][0] == {"name": "mel", "shape": ["batch", 80, 3000], "dtype": "float"}
        else:
            names = {i["name"] for i in graphs["decoder"]["signatures"]["decode_1500"]["inputs"]}
            assert {"token", "position", "self_k_0", "cross_v_3"} <= names
        text = edge_asr.load(out, backend=fmt).transcribe(speech[0][1]).text
        assert text == edge_asr.load(bundle_int8, backend=fmt).transcribe(speech[0][1]).text


def test_device_report_describes_this_machine():
    from edge_asr.device import device_info

    info = device_info()
    assert info["machine"] == platform.machine() and info["cores"] == os.cpu_count()
    assert info["onnxruntime"] and info["cpu"]


def test_firmware_cli_errors_are_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "edge_asr_deploy", "package", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "no such bundle" in run.stderr
