"""The one trainer every fine-tune of the build step runs on: reference matching (`matching.engine`), the
LSTM conversion's stages and its CTC head (`lstm.cald_train`), and CTC training from scratch
(`lstm.ctc_train`).

A run is: AdamW over parameter groups, a learning-rate schedule (linear warmup then cosine decay, or one
cycle), gradient clipping, an evaluation every `eval_every` steps (lower is better) that keeps the best
parameters, and an atomic checkpoint from which a stopped run resumes exactly: parameters, optimizer,
schedule, the data order's state (`BatchOrder`) and every random generator the loss draws from are saved,
so a resumed run computes what the uninterrupted run would have.

Checkpoints hold tensors and plain numbers only, and load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor


class BatchOrder(Protocol):
    """Where a run's batches come from, and in what order: the state it saves makes the order resumable."""

    def next_batch(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class TrainerConfig:
    steps: int
    weight_decay: float = 0.0
    schedule: str = "warmup-cosine"  # or "one-cycle" (torch's OneCycleLR; each group's "lr" is its peak)
    warmup_steps: int = 1  # warmup-cosine: linear warmup over these steps
    one_cycle_start: float = 0.15  # one-cycle: share of the steps spent rising
    clip_norm: float | None = 1.0  # gradient norm clipping; None: none
    eval_every: int = 100  # evaluate (and keep the best) every N steps and after the last
    eval_steps: tuple[int, ...] = ()  # and after these steps (an epoch's end)
    checkpoint_every: int | None = None  # None: at every evaluation; also after the last step of a run
    evaluate_first: bool = True  # evaluate before the first step (the "before" of the result)
    keep_best: bool = True  # restore the parameters that evaluated best; else keep the last


@dataclass
class TrainResult:
    steps: int
    seconds: float
    before: float | None  # the evaluation before the first step
    best: float | None  # the best evaluation (None without an evaluation)
    best_step: int
    curve: list[dict] = field(default_factory=list)  # {"step", "train_loss", "held_out", "seconds"}


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor at step s: linear warmup over `warmup` steps, then a cosine down to 0 at `steps`."""
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


class Trainer:
    """Trains `param_groups` (dicts as torch's optimizers take them) on `loss(batch)` over `batches`.

    `loss` returns the batch's scalar loss. `evaluate()` scores the current parameters (held-out loss, WER:
    lower is better). `generators`: torch generators the loss draws from (augmentation), saved with the
    checkpoint. `checkpoint`: the file a run saves to and resumes from. `on_evaluate(entry)` sees each
    evaluation's entry of the curve as it is made (a log line, a checkpoint of the model)."""

    def __init__(
        self,
        name: str,
        param_groups: list[dict],
        loss: Callable[[object], Tensor],
        batches: BatchOrder,
        config: TrainerConfig,
        evaluate: Callable[[], float] | None = None,
        checkpoint: Path | None = None,
        generators: tuple[torch.Generator, ...] = (),
        log: Callable[[str], None] = print,
        progress: bool = True,
        on_evaluate: Callable[[dict], None] | None = None,
    ):
        self.name, self.loss, self.batches, self.config = name, loss, batches, config
        self.evaluate, self.checkpoint, self.generators, self.log = evaluate, checkpoint, generators, log
        self.progress, self.on_evaluate = progress, on_evaluate
        self.params = [p for group in param_groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
        total = max(1, config.steps)  # a run of 0 steps only evaluates: its schedule is never stepped
        if config.schedule == "one-cycle":
            peaks = [group["lr"] for group in param_groups]
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, peaks, total_steps=total, pct_start=config.one_cycle_start
            )
        elif config.schedule == "warmup-cosine":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, warmup_cosine(total, max(1, config.warmup_steps))
            )
        else:
            raise ValueError(f"unknown schedule {config.schedule!r}")

    def run(self, until: int | None = None) -> TrainResult:
        """Train to `config.steps` (or stop after `until`, with a checkpoint, for a later run to resume)."""
        from tqdm import tqdm

        c, started = self.config, time.time()
        step, curve, losses = 0, [], []
        best = {"value": math.inf, "step": 0, "params": None}
        before = None
        if self.checkpoint is not None and Path(self.checkpoint).exists():
            step, curve, losses, best, before = self._resume()
            self.log(f"{self.name}: resumed at step {step} from {self.checkpoint}")
        elif self.evaluate is not None and c.evaluate_first:
            before = self._evaluate()
            curve.append({"step": 0, "train_loss": None, "held_out": round(before, 5), "seconds": 0.0})
            best = {"value": before, "step": 0, "params": self._copy()}
        last = c.steps if until is None else min(c.steps, until)
        bar = tqdm(total=c.steps, initial=step, desc=self.name, unit="step", disable=not self.progress)
        for p in self.params:
            p.requires_grad_(True)
        while step < last:
            loss = self.loss(self.batches.next_batch())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, c.clip_norm)
            self.optimizer.step()
            self.scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            bar.update()
            evaluated = step % c.eval_every == 0 or step == c.steps or step in c.eval_steps
            if evaluated:
                value = self._evaluate() if self.evaluate is not None else None
                entry = {
                    "step": step,
                    "train_loss": round(float(np.mean(losses)), 5),  # since the previous evaluation
                    "held_out": None if value is None else round(value, 5),
                    "seconds": round(time.time() - started, 1),
                }
                curve.append(entry)
                losses = []
                if value is not None and value < best["value"]:
                    best = {"value": value, "step": step, "params": self._copy()}
                if self.on_evaluate is not None:
                    self.on_evaluate(entry)
            due = (step % c.checkpoint_every == 0) if c.checkpoint_every else evaluated
            if self.checkpoint is not None and (due or step == last):
                self._save(step, curve, losses, best, before)
        bar.close()
        if c.keep_best and best["params"] is not None:
            for p, value in zip(self.params, best["params"]):
                p.data.copy_(value.to(p.device))
        for p in self.params:
            p.requires_grad_(False)
        scored = self.evaluate is not None and math.isfinite(best["value"])
        return TrainResult(
            steps=step,
            seconds=round(time.time() - started, 1),
            before=before,
            best=best["value"] if scored else None,
            best_step=best["step"],
            curve=curve,
        )

    def _evaluate(self) -> float:
        with torch.no_grad():
            return float(self.evaluate())

    def _copy(self) -> list[Tensor]:
        return [p.detach().cpu().clone() for p in self.params]

    # --- the checkpoint ---------------------------------------------------------------------------------------

    def _save(self, step: int, curve: list[dict], losses: list[float], best: dict, before: float | None) -> None:
        path = Path(self.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "params": [p.detach().cpu() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generators": [g.get_state() for g in self.generators],
            "curve": [[_number(e[k]) for k in ("step", "train_loss", "held_out", "seconds")] for e in curve],
            "losses": losses,
            "best_value": best["value"],
            "best_step": best["step"],
            "best_params": best["params"] or [],
            "before": _number(before),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a run stopped mid-save keeps the previous checkpoint

    def _resume(self):
        state = torch.load(self.checkpoint, weights_only=True)
        if "batches" not in state:
            raise ValueError(f"{self.checkpoint}: a checkpoint of an earlier version; run again without --resume")
        for p, value in zip(self.params, state["params"]):
            p.data.copy_(value.to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        for g, value in zip(self.generators, state["generators"]):
            g.set_state(value)
        keys = ("step", "train_loss", "held_out", "seconds")
        curve = [{k: _value(v, int if k == "step" else float) for k, v in zip(keys, row)} for row in state["curve"]]
        best = {
            "value": float(state["best_value"]),
            "step": int(state["best_step"]),
            "params": state["best_params"] or None,
        }
        return int(state["step"]), curve, list(state["losses"]), best, _value(state["before"], float)


def _number(value) -> float:
    return -1.0 if value is None else value  # None as -1 (no loss or time is negative): a plain number


def _value(value, kind):
    return None if value is None or value == -1.0 else kind(value)


# --- batch orders -------------------------------------------------------------------------------------------------


class NumpyState:
    """A numpy PCG64 generator's state as plain numbers (what `weights_only` checkpoints hold)."""

    @staticmethod
    def save(rng: np.random.Generator) -> list[int]:
        s = rng.bit_generator.state
        return [s["state"]["state"], s["state"]["inc"], s["has_uint32"], s["uinteger"]]

    @staticmethod
    def load(rng: np.random.Generator, flat: list) -> None:
        rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(flat[0]), "inc": int(flat[1])},
            "has_uint32": int(flat[2]),
            "uinteger": int(flat[3]),
        }


def random_state(rng: random.Random) -> list:
    """A `random.Random`'s state as plain numbers."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))


class EpochBatches:
    """Index batches drawn afresh by `draw(rng)` whenever the previous draw is used up (an epoch of shuffled
    batches), taken from the end; `items[i]` are what a batch holds."""

    def __init__(self, items: list, draw: Callable[[random.Random], list[list[int]]], seed: int):
        self.items, self.draw, self.rng, self.queue = items, draw, random.Random(seed), []

    def next_batch(self) -> list:
        if not self.queue:
            self.queue = self.draw(self.rng)
        return [self.items[i] for i in self.queue.pop()]

    def state_dict(self) -> dict:
        return {"rng": random_state(self.rng), "queue": [list(b) for b in self.queue]}

    def load_state_dict(self, state: dict) -> None:
        set_random_state(self.rng, state["rng"])
        self.queue = [[int(i) for i in b] for b in state["queue"]]


class SampledBatches:
    """`size` items drawn without replacement for every batch (random.Random.sample)."""

    def __init__(self, items: list, size: int, seed: int):
        self.items, self.size, self.rng = items, min(size, len(items)), random.Random(seed)
        self.order = list(range(len(items)))

    def next_batch(self) -> list:
        return [self.items[i] for i in self.rng.sample(self.order, self.size)]

    def state_dict(self) -> dict:
        return {"rng": random_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        set_random_state(self.rng, state["rng"])


class FixedBatches:
    """Batches made up front (every epoch's, for a schedule that needs the total), taken in order."""

    def __init__(self, batches: list):
        self.batches, self.position = batches, 0

    def next_batch(self):
        batch = self.batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
