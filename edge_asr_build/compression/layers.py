"""Layer importance and pruning: which whole blocks of a Whisper matter, measured on calibration audio.

Two measures per encoder and decoder block, on the reference's own transcripts of the calibration clips
(teacher-forced, 30 s windows):

  change   1 - cos(x, block(x)), how far the block turns the residual stream, averaged over positions (the
           clip's own frames in the encoder, every token in the decoder). A block that hardly turns its
           input adds little: the "block influence" of the layer-pruning literature.
  dropped  the output distortion with that block alone removed: the mean KL divergence of the next-token
           distributions from the unchanged model's (`calibration.Distortion`).

`prune_plan` chooses the blocks to remove one at a time, each time the one whose removal (together with
those already chosen) costs the least KL, measured again after every choice: blocks that only matter
together are not removed together by accident. `prune` removes them. The pruned model is a smaller Whisper
(its dims updated, `pruned` naming the original blocks it kept), which reference matching recovers: its
decoder block j is matched to the reference's block `pruned["decoder"][j]` (`matching.engine.matching_loss`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from edge_asr_build.compression.calibration import Distortion
from edge_asr_build.matching.data import ReferenceItem, padded
from edge_asr_build.whisper.model import Whisper

SIDES = ("encoder", "decoder")


@dataclass
class LayerImportance:
    side: str
    index: int  # the block's index in the original model
    change: float  # mean 1 - cos(input, output) of the block
    dropped: float  # KL from the unchanged model's outputs with this block alone removed

    def to_dict(self) -> dict:
        return asdict(self)


def kept_blocks(model: Whisper, side: str) -> list[int]:
    """The original indices of `side`'s blocks that `model` still has."""
    pruned = getattr(model, "pruned", None) or {}
    return list(pruned.get(side, range(len(getattr(model, side).blocks))))


@torch.inference_mode()
def block_changes(model: Whisper, items: list[ReferenceItem]) -> dict[tuple[str, int], float]:
    """{(side, original index): mean 1 - cos(input, output)} over the items' positions."""
    sums: dict[tuple[str, int], float] = {}
    counts: dict[tuple[str, int], int] = {}
    positions = {"encoder": None}

    def hook(side: str, index: int):
        def record(module, args, output):
            change = 1 - F.cosine_similarity(args[0].float(), output.float(), dim=-1)  # (B, T)
            if side == "encoder":  # the clip's own frames, not the padding after them
                change = change[:, : positions["encoder"]]
            sums[(side, index)] = sums.get((side, index), 0.0) + float(change.sum())
            counts[(side, index)] = counts.get((side, index), 0) + change.numel()

        return record

    handles = [
        block.register_forward_hook(hook(side, index))
        for side in SIDES
        for index, block in zip(kept_blocks(model, side), getattr(model, side).blocks)
    ]
    try:
        model.eval()
        for item in items:
            positions["encoder"] = max(1, item.frames // 2)  # conv2 halves the frame rate
            features = model.encoder(padded(item.mel, 3000)[None])
            model.decoder(item.tokens[None], features)
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / counts[key] for key in sums}


@contextmanager
def without(model: Whisper, side: str, indices: set[int]):
    """`model` with the blocks at positions `indices` of `side` left out, for the duration of the block."""
    stack = getattr(model, side)
    blocks = stack.blocks
    stack.blocks = nn.ModuleList([b for i, b in enumerate(blocks) if i not in indices])
    try:
        yield model
    finally:
        stack.blocks = blocks


def layer_importance(model: Whisper, distortion: Distortion, progress=None) -> list[LayerImportance]:
    """Both measures for every block of both sides (see the module docstring)."""
    changes = block_changes(model, distortion.items)
    jobs = [(side, position) for side in SIDES for position in range(len(getattr(model, side).blocks))]
    rows = []
    for side, position in progress(jobs, "drop each block") if progress else jobs:
        with without(model, side, {position}):
            dropped = distortion.of(model, encoder_changed=side == "encoder")
        index = kept_blocks(model, side)[position]
        rows.append(LayerImportance(side, index, round(changes[(side, index)], 5), round(dropped, 5)))
    return rows


def prune_plan(model: Whisper, distortion: Distortion, side: str, remove: int, log=lambda message: None) -> list[dict]:
    """Choose `remove` blocks of `side`, greedily by the KL of removing each with those already chosen.
    Returns [{"index": original index, "dropped": KL with it and all before it removed}] in order."""
    chosen: list[int] = []
    plan = []
    originals = kept_blocks(model, side)
    for _ in range(remove):
        costs = {}
        for position in range(len(originals)):
            if position not in chosen:
                with without(model, side, {*chosen, position}):
                    costs[position] = distortion.of(model, encoder_changed=side == "encoder")
        best = min(costs, key=costs.get)
        chosen.append(best)
        plan.append({"index": originals[best], "dropped": round(costs[best], 5)})
        log(f"  {side} block {originals[best]} removed: KL {costs[best]:.4f}")
    return plan


def prune(model: Whisper, remove: dict[str, list[int]]) -> Whisper:
    """A copy of `model` without the blocks whose original indices are in `remove[side]`."""
    out = copy.deepcopy(model)
    pruned = {}
    for side in SIDES:
        originals = kept_blocks(model, side)
        keep = [position for position, index in enumerate(originals) if index not in set(remove.get(side, ()))]
        stack = getattr(out, side)
        stack.blocks = nn.ModuleList([stack.blocks[position] for position in keep])
        pruned[side] = [originals[position] for position in keep]
    out.dims = replace(model.dims, n_audio_layer=len(pruned["encoder"]), n_text_layer=len(pruned["decoder"]))
    out.pruned = pruned
    return out.eval()


def importance_table(rows: list[LayerImportance]) -> str:
    lines = ["| side | block | change 1-cos | KL with it dropped |", "|---|---|---|---|"]
    lines += [f"| {r.side} | {r.index} | {r.change:.4f} | {r.dropped:.4f} |" for r in rows]
    return "\n".join(lines)
