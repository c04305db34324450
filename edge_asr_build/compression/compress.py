"""The compress pass on a Whisper: groups collected, ranks allocated, factors applied (`compress_whisper`,
`apply_structure`), a report of ranks, parameters and reconstruction error, a fingerprint that checks
rebuilt factors, and the compressed checkpoint: safetensors plus a JSON description of its shapes
(`save_compressed`), so loading it never unpickles anything."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_asr_build.compression.calibration import FINAL_STATE
from edge_asr_build.compression.factors import (
    DEFAULT_PARTS,
    PARTS,
    FactoredLinear,
    FactoredTokenEmbedding,
    attention_spectra,
    exact_token_ids,
    factor_attention,
    factor_embedding,
    factor_linear,
    set_module,
    whitener,
)
from edge_asr_build.compression.ranks import Group, allocate_measured, allocate_ranks, collect_groups, measure_groups
from edge_asr_build.whisper.model import ModelDimensions, MultiHeadAttention, Whisper


@dataclass
class CompressionReport:
    params_before: int
    params_after: int
    groups: list[Group] = field(default_factory=list)

    def table(self) -> str:
        measured = any(g.measured for g in self.groups)
        lines = [
            f"{'matrix':36} {'kind':10} {'rank':>6} {'of':>5} {'params before':>14} {'after':>10} {'rel. error':>10}"
            + (f" {'KL alone':>9}" if measured else "")
        ]
        for g in self.groups:
            rank = "dense" if g.rank is None else str(g.rank)
            kl = (g.measured or {}).get(g.rank, 0.0) if g.rank is not None else 0.0
            lines.append(
                f"{g.name:36} {g.kind:10} {rank:>6} {len(g.energy):>5} {g.dense_cost:>14,} {g.params:>10,} "
                f"{g.relative_error:>10.4f}" + (f" {kl:>9.5f}" if measured else "")
            )
        lines.append(
            f"{'total (all weights)':36} {'':10} {'':>6} {'':>5} {self.params_before:>14,} "
            f"{self.params_after:>10,}  ({1 - self.params_after / self.params_before:.1%} fewer)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "groups": [
                {
                    "name": g.name,
                    "kind": g.kind,
                    "rank": g.rank,
                    "full_rank": len(g.energy),
                    "params_before": g.dense_cost,
                    "params_after": g.params,
                    "relative_error": round(g.relative_error, 6),
                    "measured_kl": None if not g.measured or g.rank is None else g.measured.get(g.rank),
                }
                for g in self.groups
            ],
        }


def structure_of(groups: list[Group], frequent_tokens: int, dims: ModelDimensions) -> dict:
    """The shapes of a compressed model, enough to rebuild it before loading its weights."""
    structure: dict = {"twins": {}, "linear": {}, "embedding": None}
    for g in groups:
        if g.rank is None:
            continue
        if g.kind.startswith("twins"):
            module, pair = g.name.rsplit(".", 1)
            structure["twins"].setdefault(module, {"qk": None, "vo": None})[pair] = g.rank
        elif g.kind == "linear":
            structure["linear"][g.name] = g.rank
        else:
            structure["embedding"] = {
                "frequent_tokens": frequent_tokens,
                "rank": g.rank,
                "exact_ids": len(exact_token_ids(dims, frequent_tokens)),
            }
    return structure


def apply_structure(
    model: Whisper, structure: dict, weights_from_svd: bool = True, moments: dict | None = None
) -> Whisper:
    """Replace modules of `model` (in place) by their factored forms. With `weights_from_svd`, the factors
    are computed from the current weights (activation-aware where `moments` are given); otherwise they are
    left for `load_state_dict` to fill."""
    dims = model.dims
    for path, ranks in structure["twins"].items():
        attn = model.get_submodule(path)
        head_dim = attn.query.in_features // attn.n_head
        qk, vo = ranks["qk"] or head_dim, ranks["vo"] or head_dim
        if weights_from_svd:
            new = factor_attention(attn, qk, vo, attention_spectra(attn, path, moments))
        else:
            new = MultiHeadAttention(attn.query.in_features, attn.n_head, qk, vo)
        new.factored = True
        set_module(model, path, new)
    for path, rank in structure["linear"].items():
        linear = model.get_submodule(path)
        set_module(
            model,
            path,
            factor_linear(linear, rank, whitener(moments, path))
            if weights_from_svd
            else FactoredLinear(linear.in_features, linear.out_features, rank, linear.bias is not None),
        )
    if structure.get("embedding"):
        spec = structure["embedding"]
        exact = exact_token_ids(dims, spec["frequent_tokens"])
        weight = model.decoder.token_embedding.weight
        model.decoder.token_embedding = (
            factor_embedding(weight, exact, spec["rank"], whitener(moments, FINAL_STATE))
            if weights_from_svd
            else FactoredTokenEmbedding(dims.n_vocab, dims.n_text_state, exact, spec["rank"])
        )
    model.compression = structure
    return model


# Probes per side of each tensor's sketch, and the largest fingerprint distance that still counts as the same
# factors. The compact recipe's factors, rebuilt at 1 thread instead of 2, moved by 1.2e-5; under generic
# SSE4.2 kernels instead of AVX2 by 7.8e-5; from calibration audio of another seed by 2.0 (singular vectors
# flip and turn). tests/test_compress.py holds the tolerance at least 10x away from both sides.
FINGERPRINT_PROBES = 4
FACTORS_TOLERANCE = 1e-2


def factors_fingerprint(model: Whisper) -> dict:
    """A small sketch of every weight of a (compressed) model, to recognise the same factors on another CPU.

    Each tensor W, seen as a matrix (its first axis by the rest), is summarised by its norm ‖W‖ and
    S = Uᵀ W V, where U and V have FINGERPRINT_PROBES columns of ±1 drawn from a generator seeded by the
    tensor's name: the same probes on every machine. Since E‖Uᵀ D V‖² = k² ‖D‖² for such probes, two
    sketches estimate how far apart their tensors are (`fingerprint_distance`) without storing them.
    A bit-exact digest would not do: SVD, Cholesky and matrix products differ in their last bits from
    one CPU's kernels, or thread count, to another's."""
    import zlib

    k, tensors = FINGERPRINT_PROBES, {}
    for name, value in model.state_dict().items():
        w = value.detach().double().cpu().numpy()
        w = w.reshape(w.shape[0] if w.ndim else 1, -1)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        u = rng.integers(0, 2, (w.shape[0], k)) * 2.0 - 1
        v = rng.integers(0, 2, (w.shape[1], k)) * 2.0 - 1
        sketch = u.T @ w @ v
        tensors[name] = {
            "norm": float(f"{np.linalg.norm(w):.9g}"),
            "sketch": [float(f"{x:.9g}") for x in sketch.ravel()],
        }
    return {"probes": k, "tensors": tensors}


def fingerprint_distance(a: dict, b: dict) -> float:
    """The largest relative difference ‖W_a − W_b‖ / ‖W_b‖ over the tensors of two fingerprints, as their
    sketches estimate it (inf where they hold different tensors or probes)."""
    if a["probes"] != b["probes"] or a["tensors"].keys() != b["tensors"].keys():
        return float("inf")
    k, worst = a["probes"], 0.0
    for name, ref in b["tensors"].items():
        got, scale = a["tensors"][name], max(ref["norm"], 1e-12)
        sketch = np.linalg.norm(np.subtract(got["sketch"], ref["sketch"])) / k
        worst = max(worst, sketch / scale, abs(got["norm"] - ref["norm"]) / scale)
    return worst


def compress_whisper(
    model: Whisper,
    keep: float | None = None,
    energy: float | None = None,
    parts=DEFAULT_PARTS,
    attention: str = "joint",
    frequent_tokens: int = 4000,
    moments: dict | None = None,
    distortion=None,
    progress=None,
) -> tuple[Whisper, CompressionReport]:
    """A compressed copy of `model`: `keep` is the fraction of all its parameters to keep (embedding,
    norms and positional tables included), or `energy` the share of each matrix's energy to keep.

    With `moments` (`calibration.collect_moments`) the factors are activation-aware. With `distortion`
    (`calibration.Distortion`), ranks come from the measured output distortion of each matrix at each
    candidate rank (`measure_groups`, `allocate_measured`) instead of from singular-value energy."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    before = model.parameter_count()
    groups = collect_groups(model, parts, attention, frequent_tokens, moments)
    budget = None
    if keep is not None:
        if not 0 < keep <= 1:
            raise ValueError("keep must be a fraction in (0, 1]")
        fixed = before - sum(g.dense_cost for g in groups)
        budget = int(keep * before) - fixed
        if budget <= 0:
            raise ValueError(f"keeping {keep:.0%} leaves nothing for the factored parts: compress more of the model")
    if distortion is not None:
        if budget is None:
            raise ValueError("measured ranks need a parameter target (keep)")
        measure_groups(model, groups, distortion, moments, frequent_tokens, progress)
        allocate_measured(groups, budget)
    else:
        allocate_ranks(groups, budget=budget, energy=energy)
    compressed = apply_structure(
        copy.deepcopy(model), structure_of(groups, frequent_tokens, model.dims), moments=moments
    )
    return compressed, CompressionReport(before, compressed.parameter_count(), groups)


# --- saving and loading -------------------------------------------------------------------------------------


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(weights, description) of a compressed checkpoint named by either file or by their common stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.parent / (stem.name + ".safetensors"), stem.parent / (stem.name + ".json")


def save_compressed(model: Whisper, path: Path, extra: dict | None = None) -> Path:
    """`path`.safetensors with the weights and `path`.json with dims, structure and `extra`; returns the
    JSON's path."""
    from safetensors.torch import save_file

    weights, description = checkpoint_files(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The positional table too: a source may carry its own rounding of the sinusoids (float16 in CTranslate2).
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    meta = {
        "dims": model.dims.to_dict(),
        "structure": getattr(model, "compression", None),
        "pruned": getattr(model, "pruned", None),
    } | (extra or {})
    description.write_text(json.dumps(meta, indent=2) + "\n")
    return description


def load_compressed(path: Path) -> tuple[Whisper, dict]:
    from safetensors.torch import load_file

    weights, description = checkpoint_files(path)
    meta = json.loads(description.read_text())
    model = Whisper(ModelDimensions(**meta["dims"]))
    if meta.get("structure"):
        apply_structure(model, meta["structure"], weights_from_svd=False)
    state = load_file(str(weights))
    missing = model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise ValueError(f"{path}: weights missing for {sorted(missing)[:3]}")
    model.pruned = meta.get("pruned")
    return model.eval(), meta
