"""The typed manifest: what the build step writes reads back, older manifests load, and a malformed one is a
one-line BundleError naming the key."""

import json
import re

import pytest

from edge_asr.errors import BundleError
from edge_asr.manifest import FORMAT_VERSION, Manifest, read_manifest, write_manifest


def test_a_built_manifest_reads_back_typed_and_writes_the_same_json(bundle_int8, tmp_path):
    manifest = read_manifest(bundle_int8)
    assert manifest.format_version == FORMAT_VERSION and manifest.model.family == "whisper"
    assert manifest.formats == ["onnx", "ort", "tflite"]
    assert manifest.model.files("onnx") == {"encoder.int8.onnx", "decoder.int8.onnx", "decoder.int8.rows.bin"}
    assert manifest.listed_files() <= set(manifest.files)
    assert manifest.frontend.stack == 1 and manifest.frontend.context["mode"] == "full"
    assert manifest.tokenizer.special["eot"] == 50256 and manifest.decoding.guards["no_speech_threshold"] == 0.7
    assert manifest.model.tflite_max_tokens > 200 and manifest.model.dims["n_vocab"] == 51864
    assert write_manifest(tmp_path, manifest.raw) == manifest
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest.raw


def test_manifests_from_before_the_typed_schema_load_with_their_defaults(bundle_int8):
    raw = json.loads((bundle_int8 / "manifest.json").read_text())
    older = {k: v for k, v in raw.items() if k not in ("format_version", "decoding", "evaluation")}
    older["model"] = {k: v for k, v in raw["model"].items() if k != "family"}
    older["frontend"] = {k: v for k, v in raw["frontend"].items() if k != "context"}
    manifest = Manifest.from_dict(older)
    assert manifest.format_version == 0 and manifest.model.family == "whisper"
    assert manifest.frontend.context is None and manifest.decoding.grammar_threshold is None
    assert manifest.evaluation == {}


@pytest.mark.parametrize(
    "damage, key",
    [
        (lambda m: m.pop("model"), "model is missing or null"),
        (lambda m: m["frontend"].pop("n_mels"), "frontend.n_mels is missing or null"),
        (lambda m: m.update(files={"x.onnx": {"bytes": "many"}}), "files.x.onnx.bytes must be int, not str"),
        (lambda m: m.update(tokenizer=["byte-level-bpe"]), "tokenizer must be dict, not list"),
        (lambda m: m["tokenizer"].pop("tokens"), "tokenizer.tokens must name a file inside the bundle's folder"),
        (lambda m: m["model"]["dims"].pop("n_vocab"), "model.dims.n_vocab must be a positive integer"),
        (lambda m: m["frontend"].update(sample_rate=8000), "frontend.sample_rate must be 16000, not 8000"),
        (lambda m: m["frontend"]["context"].update(buckets_s=[0, 30]), "frontend.context.buckets_s must be"),
        (lambda m: m["decoder"]["special_tokens"].update(eot=-1), "decoder.special_tokens holds token -1"),
        (lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": "0"}}), "files must name a file inside"),
        # found by fuzzing: a Whisper bundle without a byte-level tokenizer failed at its first decode
        (lambda m: m["tokenizer"].update(type="byte-level-bpm"), "tokenizer.type must be byte-level-bpe"),
        (lambda m: m["model"].update(family="wav2vec"), "model.family must be whisper or lstm-ctc"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_its_key(bundle_int8, tmp_path, damage, key):
    raw = json.loads((bundle_int8 / "manifest.json").read_text())
    damage(raw)
    with pytest.raises(BundleError, match=f"malformed manifest: {re.escape(key)}"):
        write_manifest(tmp_path, raw)
    assert not (tmp_path / "manifest.json").exists()  # a builder never writes what the runtime cannot read
