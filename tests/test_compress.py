"""The compression passes: exact at full rank, budgets respected, factored graphs export and run."""
import copy

import numpy as np
import pytest
import torch

from edge_asr.backend import OnnxWhisper
from edge_asr.bundle import Bundle
from edge_asr.decoding import forced_decoding
from edge_asr.frontend import window_features
from edge_asr_build.compress import (
    PARTS,
    FactoredLinear,
    FactoredTokenEmbedding,
    apply_structure,
    compress_whisper,
    exact_token_ids,
    load_compressed,
    save_compressed,
)
from edge_asr_build.mel import mel_filters

TOKENS = [50257, 50362, 40177, 262, 34797, 8106, 319]  # prompt + " Replace the hydraulic filter on"


@pytest.fixture(scope="module")
def inputs(speech):
    mel = torch.from_numpy(window_features(speech[0][1], mel_filters()))[None]
    return mel, torch.tensor([TOKENS])


def _full_rank_structure(model, frequent_tokens=3000):
    """Every attention pair, every FFN linear and the embedding factored at full rank."""
    twins = {}
    for side in ("encoder", "decoder"):
        for i, block in enumerate(getattr(model, side).blocks):
            twins[f"{side}.blocks.{i}.attn"] = {"qk": 64, "vo": 64}
            if block.cross_attn is not None:
                twins[f"{side}.blocks.{i}.cross_attn"] = {"qk": 64, "vo": 64}
    linear = {f"{side}.blocks.{i}.mlp.{j}": 384 for side in ("encoder", "decoder") for i in range(4) for j in (0, 2)}
    return {"twins": twins, "linear": linear, "embedding": {"frequent_tokens": frequent_tokens, "rank": 384}}


def test_full_rank_factorization_reproduces_logits(tiny, inputs):
    mel, tokens = inputs
    factored = apply_structure(copy.deepcopy(tiny.model), _full_rank_structure(tiny.model))
    assert isinstance(factored.decoder.token_embedding, FactoredTokenEmbedding)
    assert isinstance(factored.encoder.blocks[0].mlp[2], FactoredLinear)
    with torch.no_grad():
        reference = tiny.model(mel, tokens)
        logits = factored(mel, tokens)
    assert (logits - reference).abs().max() <= 1e-3


def test_product_twins_keep_scores_at_full_rank_and_shrink_heads(tiny):
    """The joint factorization preserves the bilinear form, query bias included."""
    from edge_asr_build.compress import factor_attention

    attn = tiny.model.decoder.blocks[1].cross_attn
    x, y = torch.randn(1, 5, 384), torch.randn(1, 7, 384)
    with torch.no_grad():
        for rank in (64, 32):
            new = factor_attention(attn, rank, rank)
            assert new.query.out_features == 6 * rank and new.out.in_features == 6 * rank
            scores = lambda a: a.project_query(x) @ a.project_key_value(y)[0]  # noqa: E731
            error = (scores(new) - scores(attn)).norm() / scores(attn).norm()
            assert error < (1e-5 if rank == 64 else 0.5)


def test_embedding_keeps_exact_rows_exact(tiny):
    weight = tiny.model.decoder.token_embedding.weight
    exact = exact_token_ids(tiny.model.dims, 1000)
    factored = apply_structure(copy.deepcopy(tiny.model), {"twins": {}, "linear": {},
                                                           "embedding": {"frequent_tokens": 1000, "rank": 16}})
    emb = factored.decoder.token_embedding
    ids = torch.tensor([0, 999, 50256, 50300, 1000, 40000, 51000])
    rows = emb.embed(ids)
    assert torch.equal(rows[:4], weight[ids[:4]].detach())  # frequent and special tokens
    assert not torch.allclose(rows[4:], weight[ids[4:]], atol=1e-3)  # the rest is low rank
    x = torch.randn(2, 384)
    assert torch.allclose(emb.logits(x)[:, exact], x @ weight[exact].T, atol=1e-4)


@pytest.mark.parametrize("attention", ["joint", "independent"])
def test_target_fraction_is_met(tiny, attention):
    model, report = compress_whisper(tiny.model, keep=0.6, parts=PARTS, attention=attention)
    assert report.params_after == model.parameter_count()
    assert 0.59 * report.params_before <= report.params_after <= 0.6 * report.params_before
    assert all(g.rank is None or 4 <= g.rank < len(g.energy) for g in report.groups)
    assert "total (all weights)" in report.table()


def test_energy_threshold_orders_ranks(tiny):
    _, loose = compress_whisper(tiny.model, energy=0.9)
    _, tight = compress_whisper(tiny.model, energy=0.99)
    assert loose.params_after < tight.params_after
    for a, b in zip(loose.groups, tight.groups):
        assert (a.rank or 10**9) <= (b.rank or 10**9)


def test_bad_targets_are_refused(tiny):
    with pytest.raises(ValueError, match="leaves nothing"):
        compress_whisper(tiny.model, keep=0.1, parts=("decoder-mlp",))
    with pytest.raises(ValueError, match="unknown parts"):
        compress_whisper(tiny.model, keep=0.5, parts=("mlp",))


def test_save_and_load_roundtrip(tiny, tmp_path, inputs):
    mel, tokens = inputs
    model, _ = compress_whisper(tiny.model, keep=0.7)
    save_compressed(model, tmp_path / "m", {"teacher": "tiny.en"})
    loaded, meta = load_compressed(tmp_path / "m.json")
    assert meta["teacher"] == "tiny.en"
    with torch.no_grad():
        assert torch.equal(loaded(mel, tokens), model(mel, tokens))


def test_factored_model_exports_and_runs_in_onnx_runtime(tiny, tmp_path, inputs, speech):
    """fp32 ONNX of a compressed model matches torch at every cached decoding step."""
    from edge_asr_build.compress import save_compressed
    from edge_asr_build.pipeline import build_whisper_bundle

    mel, tokens = inputs
    model, _ = compress_whisper(tiny.model, keep=0.6, parts=PARTS)
    save_compressed(model, tmp_path / "m", {"teacher": "tiny.en"})
    bundle_dir = tmp_path / "bundle"
    build_whisper_bundle(str(tmp_path / "m.json"), bundle_dir, "fp32", evaluate_on=0)
    onnx_model = OnnxWhisper(Bundle.load(bundle_dir))
    cross, logits, _ = forced_decoding(onnx_model, mel[0].numpy(), TOKENS[:2], TOKENS[2:])
    assert cross[0].shape[2] == model.decoder.blocks[0].cross_attn.qk_dim < 64
    with torch.no_grad():
        reference = model(mel, tokens)[0, 1:].numpy()
    assert np.abs(logits - reference).max() < 1e-3


def test_recovery_moves_the_student_toward_the_teacher(tiny, speech, tmp_path):
    """A few distillation steps on synthesized speech lower the KL to the teacher on that speech."""
    import torch.nn.functional as F

    from edge_asr_build.recover import RecoveryConfig, decoding_rules, factor_parameters, prepare_windows, recover
    from edge_asr_build.synth import write_wav

    for i, (_, audio) in enumerate(speech):
        write_wav(tmp_path / f"{i}.wav", audio)
    student, _ = compress_whisper(tiny.model, keep=0.8)
    windows = prepare_windows(tiny.model, sorted(tmp_path.glob("*.wav")), decoding_rules(tiny), seed=0,
                              max_tokens=40, keep_features=True)
    assert all(len(w.tokens) > w.prompt_len + 5 for w in windows)  # the teacher transcribed every sentence
    frozen_before = {n: p.clone() for n, p in student.named_parameters() if "ln" in n}

    def kl() -> float:
        total = 0.0
        with torch.no_grad():
            for w in windows:
                tokens = torch.tensor([w.tokens[:-1]])
                features = w.teacher_features[None].float()
                t, s = tiny.model.decoder(tokens, features), student.decoder(tokens, features)
                total += float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"))
        return total

    before = kl()
    summary = recover(student, tiny.model, windows, RecoveryConfig(epochs=6, batch_size=3, learning_rate=5e-4,
                                                                   warmup_steps=1), log=lambda m: None)
    assert kl() < 0.7 * before
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]
    assert summary["trainable_parameters"] == sum(p.numel() for p in factor_parameters(student))
    for name, p in student.named_parameters():  # only factors train: layer norms stay as they were
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name])
