"""The command line: outputs, and one-line errors with a non-zero status for every bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "edge_asr", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-asr: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def wav(tmp_path_factory, speech):
    path = tmp_path_factory.mktemp("audio") / "utt.wav"
    sf.write(path, speech[0][1], 16000)
    return path


def test_transcribe_json(bundle_int8, wav):
    result = run_cli("transcribe", "--bundle", bundle_int8, "--json", "--threads", 1, wav)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "hydraulic filter" in out["text"].lower()
    assert out["duration_s"] == pytest.approx(sf.info(wav).duration, abs=1e-3)
    assert out["rtf"] == pytest.approx(out["processing_s"] / out["duration_s"], rel=0.01)


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("missing.wav", None, "no such file"),
        ("empty.wav", b"", "not a readable audio file"),
        ("corrupt.wav", b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio", "not a readable audio file"),
        ("notes.mp4", b"\x00\x00\x00\x18ftypmp42 this is no audio", "not a readable audio file"),
    ],
)
def test_bad_audio(bundle_int8, tmp_path, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(run_cli("transcribe", "--bundle", bundle_int8, path), str(path), fragment)


def test_audio_without_samples(bundle_int8, tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    assert_one_line_error(run_cli("transcribe", "--bundle", bundle_int8, path), "no audio samples")


def test_missing_bundle(tmp_path, wav):
    assert_one_line_error(run_cli("transcribe", "--bundle", tmp_path / "nope", wav), "no such bundle")


def test_not_a_bundle(tmp_path, wav):
    (tmp_path / "manifest.json").write_text("{not json")
    assert_one_line_error(run_cli("transcribe", "--bundle", tmp_path, wav), "corrupt manifest")


def test_malformed_manifest(bundle_int8, tmp_path, wav):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_int8, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["frontend"]["mel_filters"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(
        run_cli("transcribe", "--bundle", copy, wav), "malformed manifest: frontend.mel_filters must name a file"
    )


@pytest.mark.parametrize("name", ["decoder.int8.onnx", "decoder.int8.rows.bin"])
def test_tampered_bundle_is_refused(bundle_int8, tmp_path, wav, name):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_int8, copy)
    with open(copy / name, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert_one_line_error(run_cli("transcribe", "--bundle", copy, wav), name, "sha256")


def test_incomplete_bundle_is_refused(bundle_int8, tmp_path, wav):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_int8, copy)
    (copy / "tokens.json").unlink()
    assert_one_line_error(run_cli("transcribe", "--bundle", copy, wav), "missing tokens.json")


def test_bundle_format_versions_up_to_the_runtimes_load_and_a_newer_one_is_refused(bundle_int8, tmp_path, wav):
    from edge_asr.bundle import FORMAT_VERSION, Bundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_int8, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    # bundles made before the version was written, and before prompt chunks
    for older in ({k: v for k, v in manifest.items() if k != "format_version"}, {**manifest, "format_version": 1}):
        (copy / "manifest.json").write_text(json.dumps(older))
        assert Bundle.load(copy).manifest.name == manifest["name"]
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(
        run_cli("transcribe", "--bundle", copy, wav),
        f"bundle format {FORMAT_VERSION + 1}",
        "newer than this runtime reads",
    )


def test_unknown_build_source(tmp_path):
    assert_one_line_error(run_cli("build", "--source", tmp_path / "no-model", "--out", tmp_path / "b"), "no such file")


def test_bench_json_on_synthesized_set(bundle_int8, tmp_path, speech):
    folder = tmp_path / "set"
    folder.mkdir()
    lines = []
    for i, (text, audio) in enumerate(speech):
        sf.write(folder / f"u{i}.flac", audio, 16000)
        lines.append(f"u{i}\t{text}")
    (folder / "refs.tsv").write_text("\n".join(lines) + "\n")
    result = run_cli("bench", "--bundle", bundle_int8, "--json", "--runs", 1, folder)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"wer", "rtf_wall", "rtf_cpu", "peak_rss_mb", "bundle_mb", "params"} <= set(out)
    # bundle_mb: what ONNX Runtime loads, the decoder's lookup rows (20 MB, mapped in place) included
    assert out["wer"] <= 10.0 and out["params"] == 37_184_256 and 50 < out["bundle_mb"] < 65
    assert 0 < out["rtf_wall"] < 1 and out["peak_rss_mb"] > 0


def test_bench_folder_without_refs(bundle_int8, tmp_path):
    assert_one_line_error(run_cli("bench", "--bundle", bundle_int8, tmp_path), "no refs.tsv")


def test_compress_refuses_bad_targets(tmp_path, capsys):
    from edge_asr.cli import main

    assert (
        main(["compress", "--keep", "0.05", "--parts", "embedding", "--factors", "plain", "--out", str(tmp_path / "m")])
        == 1
    )
    err = capsys.readouterr().err.strip()  # the steps it got through, then one line of error
    assert err.splitlines()[-1].startswith("edge-asr: error:") and "Traceback" not in err
    assert main(["compress", "--keep", "0.5", "--parts", "mlp", "--out", str(tmp_path / "m")]) == 1
    assert "unknown parts" in capsys.readouterr().err


def test_prune_refuses_missing_inputs(tmp_path, capsys):
    from edge_asr.cli import main

    for args, fragment in [
        (["--corpus", "no-such-corpus"], "no such folder"),
        (["--source", str(tmp_path / "missing.pt")], "no such file or directory"),
    ]:
        assert main(["prune", "--out", str(tmp_path / "d.safetensors"), *args]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("edge-asr: error:") and "\n" not in err and fragment in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--ranks-from", "nothing.safetensors"], "no such delta file"),
        (["--corpus", "no-such-corpus"], "no such folder"),
    ],
)
def test_recover_refuses_missing_inputs(tmp_path, capsys, args, fragment):
    from edge_asr.cli import main

    assert main(["recover", "--out", str(tmp_path / "d.safetensors"), *args]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-asr: error:") and "\n" not in err and fragment in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["build", "--context", "45"], "--context takes auto, full or seconds"),
        (["build", "--context", "auto", "--source", "m.pt"], "needs a model adapted to short context"),
        (["build", "--context", "auto", "--delta", "missing.safetensors"], "no such delta file"),
        (["build", "--context", "full", "--delta", "d.safetensors"], "use it with --context auto"),
        (["adapt", "--out", "d.safetensors", "--corpus", "no-such-folder"], "no such folder"),
    ],
)
def test_context_options_refuse_bad_input(tmp_path, args, fragment):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_asr",
            *args,
            "--out" if args[0] == "build" else "--seed",
            str(tmp_path / "b") if args[0] == "build" else "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert_one_line_error(result, fragment)
