"""Layer pruning: importance measured on real outputs, pruned models exact where nothing is removed, the
pruned student matched to the blocks it kept; and Whisper base's parts joined only when their sha256 is known."""

import copy
import hashlib

import pytest
import torch

from edge_asr.frontend import window_features
from edge_asr_build.compression.calibration import Distortion
from edge_asr_build.compression.compress import load_compressed, save_compressed
from edge_asr_build.compression.layers import block_changes, layer_importance, prune, prune_plan, without
from edge_asr_build.matching.data import clip_mel, reference_item
from edge_asr_build.matching.engine import matching_loss, reference_layers
from edge_asr_build.sources import SourceError, join_parts
from edge_asr_build.whisper.mel import mel_filters

TOKENS = [50257, 50362, 40177, 262, 34797, 8106, 319]  # prompt + " Replace the hydraulic filter on"


@pytest.fixture(scope="module")
def items(tiny, speech):
    from edge_asr_build.whisper.vocabulary import decoding_rules

    return [reference_item(tiny.model, clip_mel(audio, mel_filters()), decoding_rules(tiny)) for _, audio in speech[:2]]


def test_pruning_nothing_reproduces_the_model_and_a_pruned_block_is_gone(tiny, speech):
    mel = torch.from_numpy(window_features(speech[0][1], mel_filters()))[None]
    tokens = torch.tensor([TOKENS])
    with torch.no_grad():
        reference = tiny.model(mel, tokens)
        assert torch.equal(prune(tiny.model, {})(mel, tokens), reference)
        pruned = prune(tiny.model, {"decoder": [1], "encoder": [3]})
        assert pruned.pruned == {"encoder": [0, 1, 2], "decoder": [0, 2, 3]}
        assert (pruned.dims.n_audio_layer, pruned.dims.n_text_layer) == (3, 3)
        with without(tiny.model, "decoder", {1}), without(tiny.model, "encoder", {3}):
            skipped = tiny.model(mel, tokens)
        assert torch.allclose(pruned(mel, tokens), skipped, atol=1e-5)
        assert (pruned(mel, tokens) - reference).abs().max() > 1e-2
        # pruning a pruned model removes original indices, not positions
        again = prune(pruned, {"decoder": [2]})
        assert again.pruned["decoder"] == [0, 3]
    assert len(tiny.model.decoder.blocks) == 4  # the source is untouched


def test_a_pruned_checkpoint_round_trips(tiny, tmp_path):
    pruned = prune(tiny.model, {"decoder": [0, 2]})
    save_compressed(pruned, tmp_path / "p", {"teacher": "tiny.en"})
    loaded, meta = load_compressed(tmp_path / "p")
    assert loaded.pruned == {"encoder": [0, 1, 2, 3], "decoder": [1, 3]}
    tokens = torch.tensor([TOKENS])
    mel = torch.zeros(1, 80, 3000)
    with torch.no_grad():
        assert torch.equal(loaded(mel, tokens), pruned(mel, tokens))


def test_importance_is_measured_on_outputs(tiny, items):
    distortion = Distortion.of_reference(tiny.model, items)
    changes = block_changes(tiny.model, items)
    assert len(changes) == 8 and all(0.0 < c < 2.0 for c in changes.values())
    rows = layer_importance(tiny.model, distortion)
    assert [(r.side, r.index) for r in rows] == [(s, i) for s in ("encoder", "decoder") for i in range(4)]
    assert all(r.dropped > 1e-3 for r in rows)  # every block of a trained model matters somewhat
    plan = prune_plan(tiny.model, distortion, "decoder", 2)
    assert len({p["index"] for p in plan}) == 2
    # removing a second block never costs less than the first alone did (greedy, measured again)
    assert plan[1]["dropped"] >= plan[0]["dropped"] - 1e-6
    # the plan's first choice is the block whose lone removal costs least
    decoder = [r for r in rows if r.side == "decoder"]
    assert plan[0]["index"] == min(decoder, key=lambda r: r.dropped).index


def test_a_pruned_student_matches_the_blocks_it_kept(tiny, items):
    student = prune(tiny.model, {"decoder": [1]})
    assert reference_layers(student, 5) == [0, 2, 3, 4]
    assert reference_layers(tiny.model, 5) == [0, 1, 2, 3, 4]
    # the unchanged model matches itself exactly; the pruned one not
    frames = [3000] * len(items)
    with torch.no_grad():
        same, _ = matching_loss(copy.deepcopy(tiny.model), items, frames, "cpu")
        pruned_loss, _ = matching_loss(student, items, frames, "cpu")
    assert float(same) < 1e-6
    assert float(pruned_loss) > 1e-3


def test_base_parts_are_joined_only_with_a_known_sha256(tmp_path):
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(b"first half ")
    parts[1].write_bytes(b"second half")
    (tmp_path / "config.json").write_text("{}")
    good = hashlib.sha256(b"first half second half").hexdigest()
    out = join_parts(parts, [tmp_path / "config.json"], tmp_path / "joined", {good})
    assert (out / "model.bin").read_bytes() == b"first half second half"
    assert (out / "config.json").exists()
    with pytest.raises(SourceError, match="not a known Whisper base"):
        join_parts(parts, [], tmp_path / "other", {"0" * 64})
    assert not (tmp_path / "other" / "model.bin").exists()
    # a joined file altered later is hashed again and remade from the parts
    (out / "model.bin").write_bytes(b"tampered")
    join_parts(parts, [tmp_path / "config.json"], tmp_path / "joined", {good})
    assert (out / "model.bin").read_bytes() == b"first half second half"


def test_a_multilingual_decoder_never_emits_a_language_token():
    from edge_asr.decoding import suppression_masks

    special = {
        "eot": 50257,
        "sot": 50258,
        "english": 50259,
        "transcribe": 50359,
        "translate": 50358,
        "sot_prev": 50361,
        "sot_lm": 50360,
        "no_speech": 50362,
        "no_timestamps": 50363,
        "timestamp_begin": 50364,
    }
    config = {"special_tokens": special, "suppress_tokens": [], "suppress_blank": [220], "n_vocab": 51865}
    suppress, first = suppression_masks(config)
    assert suppress[50259:50358].all() and suppress[50300]  # every language token
    assert not suppress[50257] and not suppress[100]  # end of text and text stay allowed
    assert first[50257] and first[220]


def test_a_pruned_delta_rebuilds_its_model_and_refuses_another(tiny, tmp_path):
    from edge_asr.errors import EdgeAsrError
    from edge_asr_build.matching.lora import add_lora, save_delta
    from edge_asr_build.recipes.prune import pruned_model

    student = prune(tiny.model, {"decoder": [2]})
    add_lora(student, 2, 2.0)
    for name, p in student.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.01)  # a trained delta is not zero
    metadata = {
        "kind": "pruned-context-lora",
        "source": tiny.source,
        "rank": 2,
        "alpha": 2.0,
        "pruned": student.pruned,
        "params_before": 0,
        "params_after": 0,
        "result": {"held_out_before": None, "held_out_best": None},
    }
    save_delta(student, tmp_path / "d.safetensors", metadata)
    model, summary = pruned_model(tiny, tmp_path / "d.safetensors")
    assert model.pruned == {"encoder": [0, 1, 2, 3], "decoder": [0, 1, 3]} and summary["rank"] == 2
    mel, tokens = torch.zeros(1, 80, 3000), torch.tensor([TOKENS])
    with torch.no_grad():
        assert torch.allclose(model(mel, tokens), student(mel, tokens), atol=1e-3)
    other = copy.copy(tiny)
    other.source = dict(tiny.source, sha256="0" * 64)
    with pytest.raises(EdgeAsrError, match="trained on another model"):
        pruned_model(other, tmp_path / "d.safetensors")
