"""Every source format loads into the same model, and that model computes what the originals compute."""

import json
import pickle

import numpy as np
import pytest
import torch

from edge_asr.frontend import window_features
from edge_asr_build.sources import SourceError, load_whisper
from edge_asr_build.whisper.mel import mel_filters


@pytest.fixture(scope="module")
def mel(speech):
    audio = speech[0][1]
    return window_features(audio, mel_filters())


def test_tiny_en_dimensions_and_provenance(tiny):
    dims = tiny.model.dims
    assert (dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state, dims.n_vocab) == (4, 4, 384, 51864)
    assert len(tiny.source["sha256"]) == 64 and tiny.source["format"] == "ctranslate2"
    assert 50257 in tiny.suppress_tokens  # <|startoftranscript|>, from the model's config.json


def test_encoder_matches_ctranslate2(tiny, mel):
    """The converted weights reproduce CTranslate2's own encoder on the same features."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from edge_asr_build.sources import embedded_model_dir

    ct2 = ctranslate2.models.Whisper(str(embedded_model_dir()), device="cpu", compute_type="float32")
    theirs = np.array(ct2.encode(ctranslate2.StorageView.from_array(mel[None])))
    with torch.no_grad():
        ours = tiny.model.encoder(torch.from_numpy(mel)[None]).numpy()
    assert np.abs(ours - theirs).max() < 2e-3


def test_model_matches_openai_whisper(tiny, mel):
    whisper_model = pytest.importorskip("whisper.model", reason="reference implementation: openai-whisper")
    reference = whisper_model.Whisper(whisper_model.ModelDimensions(**tiny.model.dims.to_dict()))
    reference.load_state_dict(tiny.model.state_dict())
    tokens = torch.tensor([[50257, 50362, 40177, 262, 34797]])
    with torch.no_grad():
        ours = tiny.model(torch.from_numpy(mel)[None], tokens)
        theirs = reference(torch.from_numpy(mel)[None], tokens)
    assert torch.allclose(ours, theirs, atol=1e-3)


def test_kv_cache_decoding_equals_teacher_forcing(tiny, mel):
    model, tokens = tiny.model, [50257, 50362, 40177, 262, 34797, 8106]
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(mel)[None])
        full = model.decoder(torch.tensor([tokens]), features)
        cross = model.decoder.cross_kv(features)
        logits, cache = model.decoder.forward_cached(torch.tensor([tokens[:2]]), model.empty_cache(), cross)
        steps = [logits]
        for t in tokens[2:-1]:
            logits, cache = model.decoder.forward_cached(torch.tensor([[t]]), cache, cross)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps), full[0, 1:-1], atol=1e-3)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_openai_checkpoint_roundtrip(tiny, tmp_path):
    path = tmp_path / "tiny.en.pt"
    torch.save({"dims": tiny.model.dims.to_dict(), "model_state_dict": tiny.model.state_dict()}, path)
    loaded = load_whisper(path)
    assert _same_weights(loaded.model, tiny.model)
    assert loaded.source["format"] == "openai-whisper"
    # Computed from the tokenizer, the non-speech list equals CTranslate2's, which also names special tokens.
    assert {t for t in tiny.suppress_tokens if t < 50256} == set(loaded.suppress_tokens)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"dims": _Payload()}, f, protocol=2)
    with pytest.raises(SourceError, match="not an openai-whisper checkpoint"):
        load_whisper(path)


def test_huggingface_directory(tiny, tmp_path):
    from safetensors.torch import save_file

    renames = [
        ("encoder.positional_embedding", "model.encoder.embed_positions.weight"),
        ("decoder.positional_embedding", "model.decoder.embed_positions.weight"),
        ("decoder.token_embedding.", "model.decoder.embed_tokens."),
        ("encoder.ln_post.", "model.encoder.layer_norm."),
        ("decoder.ln.", "model.decoder.layer_norm."),
        (".blocks.", ".layers."),
        ("encoder.conv", "model.encoder.conv"),
        (".cross_attn_ln.", ".encoder_attn_layer_norm."),
        (".attn_ln.", ".self_attn_layer_norm."),
        (".mlp_ln.", ".final_layer_norm."),
        (".cross_attn.", ".encoder_attn."),
        (".attn.", ".self_attn."),
        (".query.", ".q_proj."),
        (".key.", ".k_proj."),
        (".value.", ".v_proj."),
        (".out.", ".out_proj."),
        (".mlp.0.", ".fc1."),
        (".mlp.2.", ".fc2."),
    ]
    hf = {}
    for name, tensor in tiny.model.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        if not name.startswith("model."):
            name = "model." + name
        hf[name] = tensor.contiguous()
    save_file(hf, str(tmp_path / "model.safetensors"))
    d = tiny.model.dims
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                model_type="whisper",
                num_mel_bins=d.n_mels,
                max_source_positions=d.n_audio_ctx,
                d_model=d.n_audio_state,
                encoder_attention_heads=d.n_audio_head,
                encoder_layers=d.n_audio_layer,
                vocab_size=d.n_vocab,
                max_target_positions=d.n_text_ctx,
                decoder_attention_heads=d.n_text_head,
                decoder_layers=d.n_text_layer,
            )
        )
    )
    (tmp_path / "tokenizer.json").write_bytes(tiny.tokenizer_json.read_bytes())
    loaded = load_whisper(tmp_path)
    assert _same_weights(loaded.model, tiny.model) and loaded.source["format"] == "huggingface"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "neither a CTranslate2 model"),
        (
            lambda p: (
                p.mkdir(),
                (p / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0c\x00WhisperSpec\x00\x01"),
                (p / "tokenizer.json").write_text("{}"),
                p,
            )[-1],
            "not a readable CTranslate2 model",
        ),
    ],
)
def test_bad_sources_give_clear_errors(tmp_path, make, message):
    with pytest.raises(SourceError, match=message):
        load_whisper(make(tmp_path / "model"))


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="openai/whisper-tiny.en"):
        load_whisper("openai/whisper-tiny.en")
