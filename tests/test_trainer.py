"""The one trainer: every fine-tune's loop runs on it, and a stopped run resumes to the weights of the run
that was never stopped (parameters, optimizer, schedule, data order and generators in the checkpoint)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import teacher_clips

from edge_asr_build.trainer import EpochBatches, FixedBatches, SampledBatches, Trainer, TrainerConfig, warmup_cosine


def _toy_run(order_kind: str, checkpoint=None, until=None):
    """A linear regression whose loss draws noise from its own generator, on one of the batch orders."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(4), torch.randn(1)) for _ in range(23)]
    generator = torch.Generator().manual_seed(5)
    order = {
        "epochs": lambda: EpochBatches(data, lambda rng: [rng.sample(range(23), 5) for _ in range(4)], seed=1),
        "sampled": lambda: SampledBatches(data, 6, seed=2),
        "fixed": lambda: FixedBatches([data[i : i + 3] for i in range(0, 21, 3)] * 3),
    }[order_kind]()

    def loss(batch):
        x = torch.stack([b[0] for b in batch]) + 0.1 * torch.randn(len(batch), 4, generator=generator)
        return ((model(x) - torch.stack([b[1] for b in batch])) ** 2).mean()

    held = torch.randn(8, 4)
    trainer = Trainer(
        "toy",
        [{"params": list(model.parameters()), "lr": 0.05}],
        loss,
        order,
        TrainerConfig(
            steps=18, warmup_steps=3, eval_every=4, schedule="one-cycle" if order_kind == "fixed" else "warmup-cosine"
        ),
        evaluate=lambda: float(model(held).pow(2).mean()),
        checkpoint=checkpoint,
        generators=(generator,),
        log=lambda m: None,
        progress=False,
    )
    return model, trainer.run(until)


@pytest.mark.parametrize("order_kind", ["epochs", "sampled", "fixed"])
def test_the_trainer_resumes_exactly_and_keeps_the_best(order_kind, tmp_path):
    whole, result = _toy_run(order_kind)
    _toy_run(order_kind, tmp_path / "c.pt", until=9)  # stopped after step 9 (a checkpoint between evaluations)
    resumed, again = _toy_run(order_kind, tmp_path / "c.pt")
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    assert again.curve == [{**e, "seconds": a["seconds"]} for e, a in zip(result.curve, again.curve)]
    held_out = [e["held_out"] for e in result.curve]
    assert result.best == pytest.approx(min(held_out), abs=1e-5) and result.before == pytest.approx(
        held_out[0], abs=1e-5
    )


def test_a_run_of_zero_steps_only_evaluates(tmp_path):
    """`edge-asr adapt --steps 0` (and recover, prune) asks for no training: the run measures and stops."""
    from edge_asr_build.matching.engine import MatchConfig
    from edge_asr_build.recipes.run import RecipeRun

    assert RecipeRun("tiny.en", tmp_path / "d.safetensors", steps=0).match(MatchConfig(steps=450)).steps == 0
    assert RecipeRun("tiny.en", tmp_path / "d.safetensors").match(MatchConfig(steps=450)).steps == 450
    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(
        "none",
        [{"params": list(model.parameters()), "lr": 0.1}],
        lambda batch: model(batch).sum(),
        FixedBatches([torch.ones(1, 2)]),
        TrainerConfig(steps=0),
        evaluate=lambda: 1.5,
        log=lambda m: None,
        progress=False,
    )
    result = trainer.run()
    assert result.steps == 0 and result.before == result.best == 1.5 and result.best_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_warmup_cosine_rises_then_falls_to_zero():
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0, abs=0.03) and f(100) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


# --- every fine-tune of the build step -------------------------------------------------------------------------


def _match_reference(tiny, short_items, checkpoint, until):
    from edge_asr_build.matching.engine import MatchConfig, match_reference
    from edge_asr_build.matching.lora import lora_tensors

    student = copy.deepcopy(tiny.model)
    config = MatchConfig(
        steps=10, batch_size=2, learning_rate=1e-4, warmup_steps=2, lora_rank=4, lora_alpha=4, checkpoint_every=5
    )
    match_reference(
        student, short_items[0], config, lambda frames, rng: 100, checkpoint=checkpoint, until=until, log=lambda m: None
    )
    return list(lora_tensors(student).values())


def _cald_stage(tiny, stage, checkpoint, until):
    from edge_asr_build.lstm.cald import from_whisper
    from edge_asr_build.lstm.cald_train import (
        CaldRecipe,
        CtcStreamLoss,
        layerwise_loss,
        lstm_params,
        run_stage,
        train_head,
    )

    encoder = copy.deepcopy(tiny.model.encoder).eval()
    clips, held_out = teacher_clips(encoder, 6, seed=1), teacher_clips(encoder, 2, seed=2)
    torch.manual_seed(0)
    model = from_whisper(encoder)
    recipe = CaldRecipe(batch_frames=200, eval_every=4, head_steps=12)
    if stage == "head":
        train_head(model, clips, held_out, recipe, lambda m: None, checkpoint, until)
        return list(model.head.parameters())
    loss = layerwise_loss if stage == "layerwise" else CtcStreamLoss(seed=3)
    groups = [{"params": lstm_params(model), "lr": 1e-3}]
    run_stage(stage, model, groups, loss, clips, held_out, 10, recipe, checkpoint, lambda m: None, until=until)
    return lstm_params(model)


def _train_ctc(checkpoint, until):
    from edge_asr_build.lstm.ctc_train import Example, TrainConfig, encode_text, train_ctc
    from edge_asr_build.lstm.model import LstmConfig, LstmCtc

    rng = np.random.default_rng(0)
    words = ["stop", "seven", "zero"]
    examples = [
        Example(rng.normal(-4, 1, (int(rng.integers(60, 120)), 80)).astype(np.float16), encode_text(w), w)
        for w in words * 6
    ]
    torch.manual_seed(0)
    model = LstmCtc(LstmConfig(hidden=[32], proj=[0]))
    config = TrainConfig(epochs=3, lr=1e-2, max_frames=400, spec_augment=True, sorta_grad=True)
    train_ctc(model, examples, config, log=lambda m: None, progress=False, checkpoint=checkpoint, until=until)
    return list(model.parameters())


@pytest.mark.parametrize("loop", ["match_reference", "layerwise", "ctc", "head", "train_ctc"])
def test_a_stopped_run_resumes_to_the_same_weights(loop, tiny, short_items, tmp_path):
    """Each training loop of the build step, stopped after 7 steps and resumed, ends where the uninterrupted
    run ends: reference matching, the LSTM conversion's stages (its CTC stage with SpecAugment's generator)
    and head, and CTC training from scratch."""
    run = {
        "match_reference": lambda c, u: _match_reference(tiny, short_items, c, u),
        "layerwise": lambda c, u: _cald_stage(tiny, "layerwise", c, u),
        "ctc": lambda c, u: _cald_stage(tiny, "ctc", c, u),
        "head": lambda c, u: _cald_stage(tiny, "head", c, u),
        "train_ctc": _train_ctc,
    }[loop]
    whole = [p.detach().clone() for p in run(None, None)]
    run(tmp_path / "c.pt", 7)
    resumed = run(tmp_path / "c.pt", None)
    assert len(whole) == len(resumed) and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(whole, resumed))
    assert any(not torch.equal(a, b) for a, b in zip(whole, run(None, 1)))  # the steps after the first did train
