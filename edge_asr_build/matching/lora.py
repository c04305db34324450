"""Low-rank adapters (LoRA): train a small delta beside frozen weights, ship it, merge it at build time.

A linear layer y = W x + b becomes y = W x + b + (alpha / r) B A x, with A (r, in) and B (out, r); B starts
at zero, so an adapted model starts as the reference. After training, W + (alpha / r) B A is merged back into
an ordinary `nn.Linear`: exported graphs never see an adapter. The delta file (safetensors) holds only A and
B per adapted layer, a few MB where the model is tens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initializes its weight

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def _linears(model: nn.Module, parts: tuple[str, ...]):
    """(parent, attribute name, qualified name, module) of every nn.Linear inside the named submodules."""
    for part in parts:
        try:
            root = model.get_submodule(part)
        except AttributeError:
            raise ValueError(f"the model has no part {part!r} to adapt") from None
        for name, parent in root.named_modules():
            if isinstance(parent, LoraLinear):
                continue  # its `base` is the layer it adapts, not another one
            for child_name, child in parent.named_children():
                if isinstance(child, (nn.Linear, LoraLinear)):
                    yield parent, child_name, ".".join(filter(None, [part, name, child_name])), child


def add_lora(
    model: nn.Module, rank: int, alpha: float, parts: tuple[str, ...] = ("encoder", "decoder")
) -> list[nn.Parameter]:
    """Wrap every linear layer of `parts` in place; returns the adapters' parameters (the only trainable ones)."""
    params = []
    for parent, attr, _, linear in list(_linears(model, parts)):
        adapter = LoraLinear(linear, rank, alpha).to(linear.weight.device)
        setattr(parent, attr, adapter)
        params += [adapter.lora_a, adapter.lora_b]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapter by the plain linear layer it amounts to (in place)."""
    for parent, attr, _, module in list(_linears(model, ("",))):
        if isinstance(module, LoraLinear):
            setattr(parent, attr, module.merged())
    return model


def lora_tensors(model: nn.Module) -> dict[str, Tensor]:
    """{"<layer>.lora_a": A, "<layer>.lora_b": B} of every adapter: what a delta file holds."""
    out = {}
    for _, _, name, module in _linears(model, ("",)):
        if isinstance(module, LoraLinear):
            out[f"{name}.lora_a"] = module.lora_a.detach().cpu().contiguous()
            out[f"{name}.lora_b"] = module.lora_b.detach().cpu().contiguous()
    return out


# Prefix of whole tensors a delta replaces (small ones trained directly, e.g. a factored embedding's projection).
WHOLE = "whole:"


def save_delta(model: nn.Module, path: Path, metadata: dict, whole: list[str] = ()) -> Path:
    """The adapters as float16 safetensors, with `metadata` (rank, alpha, recipe) in the header, and the
    parameters named in `whole` as they are."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half() for k, v in lora_tensors(model).items()}
    tensors |= {WHOLE + name: model.get_parameter(name).detach().cpu().half().contiguous() for name in whole}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"edge_asr_delta": json.dumps(metadata, sort_keys=True)})
    tmp.chmod(0o644)  # a file to ship and share, not a private one
    tmp.replace(path)
    return path


def read_delta(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}, _metadata(f)


def delta_metadata(path: Path) -> dict:
    """A delta file's metadata alone (its kind, recipe, structure), without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return _metadata(f)


def _metadata(f) -> dict:
    return json.loads((f.metadata() or {}).get("edge_asr_delta", "{}"))


def apply_delta(model: nn.Module, path: Path) -> dict:
    """Merge a delta file's adapters into `model` (in place); returns its metadata. Refuses a delta whose
    layers or shapes do not fit the model."""
    tensors, metadata = read_delta(path)
    whole = {k[len(WHOLE) :]: tensors.pop(k) for k in list(tensors) if k.startswith(WHOLE)}
    rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
    parts = tuple(metadata.get("parts", ("encoder", "decoder")))
    add_lora(model, rank, alpha, parts)
    adapters = {name: m for _, _, name, m in _linears(model, parts) if isinstance(m, LoraLinear)}
    expected = {f"{n}.lora_{k}" for n in adapters for k in "ab"}
    if set(tensors) != expected:
        raise ValueError(
            f"{path}: the delta's layers do not match this model's ({len(set(tensors) ^ expected)} differ)"
        )
    with torch.no_grad():
        for name, module in adapters.items():
            for kind in "ab":
                target, value = getattr(module, f"lora_{kind}"), tensors[f"{name}.lora_{kind}"]
                if target.shape != value.shape:
                    raise ValueError(
                        f"{path}: {name}.lora_{kind} has shape {tuple(value.shape)}, "
                        f"the model wants {tuple(target.shape)}"
                    )
                target.copy_(value)
        for name, value in whole.items():
            try:
                target = model.get_parameter(name)
            except AttributeError:
                raise ValueError(f"{path}: the model has no {name} to replace") from None
            if target.shape != value.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(value.shape)}, the model wants {tuple(target.shape)}"
                )
            target.copy_(value)
    merge_lora(model)
    return metadata
