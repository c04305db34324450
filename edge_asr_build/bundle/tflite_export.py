"""TFLite export pass: the same models as the ONNX graphs, as LiteRT (TensorFlow Lite) flatbuffers for
tflite-runtime / ai-edge-litert on devices where ONNX Runtime has no wheel (armv7) or an app prefers LiteRT.

TFLite wants static shapes, so the graphs differ from the ONNX ones in how they handle time:

  whisper  The encoder has one signature per window length the bundle's context policy uses (3000 frames
           alone for a 30 s model); the decoder one per audio class (`audio_classes`: a few lengths that the
           windows' cross-attention inputs are padded to). The signatures of a file share its weights.
           encoder.tflite  "encode_<frames>": mel (1, n_mels, frames) -> cross_k_i, cross_v_i (as encoder.onnx)
           decoder.tflite  "decode_<positions>": one token at a time over a fixed-length self-attention cache:
               token (1, 1) int32, position (1,) int32, self_k_i (1, H, qk, L), self_v_i (1, H, L, vo),
               cross_k_i, cross_v_i (a window's, zero-padded to the class's positions), and where a class
               holds shorter windows, audio_positions (1,) int32 (the window's own; later ones are masked)
               ->  logits (1, n_vocab), k_i (1, H, qk, 1), v_i (1, H, 1, vo)
           Every signature carries its own tensor tables and quantization parameters (0.9 MB for tiny.en's
           decoder, all read at load) and, once run, its own arena: eight window lengths with a prompt-chunk
           signature each made 16 decoder signatures, 65 MB resident after loading; three classes make 6.
           The graph returns only the new token's key and value; the runtime writes them into slot
           `position` of the cache it feeds back. Slots at or after `position` are masked, so unwritten
           slots never matter, and a step copies a few kilobytes instead of the whole cache.
                           "prefill_<positions>": the same for PROMPT_CHUNK tokens at once (token
               (1, PROMPT_CHUNK), slots position…, each token seeing the slots up to its own; k_i and v_i
               for each), so that a prompt costs a run per chunk: a command grammar's 24-token prompt took
               106-185 ms a token at a time and 16-28 ms in chunks (LiteRT, 2 threads, a 1 s window).
  lstm-ctc acoustic.tflite (`edge_asr_build.lstm.tflite_export`, on the conversion helpers here)

Conversion is litert-torch's (torch.export, then the LiteRT converter); int8 weights come from
ai-edge-quantizer's dynamic recipe (int8 weights per channel, activations quantized on the fly).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import multiprocessing
import os
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_asr.context import FRAMES_PER_SECOND
from edge_asr_build.bundle.onnx_export import cache_names
from edge_asr_build.compression.factors import FactoredTokenEmbedding
from edge_asr_build.compression.quantize import write_in_pieces
from edge_asr_build.whisper.model import Whisper

# Decoder cache slots: the prompt plus openai-whisper's sample_len (224 new tokens), rounded up.
MAX_TOKENS = 232
# Prompt tokens a "prefill" signature takes at once: a command grammar's prompt (up to 34 tokens) costs a few
# runs instead of a run per token.
PROMPT_CHUNK = 8
MASKED = -1e9  # not -inf: a fully masked row must stay finite, and every int8 kernel handles a finite value
# The decoder's audio classes, in seconds: a window's cross-attention inputs are padded to the shortest class
# that holds it. Three keep the padding cheap (at most 1.5 M more multiply-adds a token, of about 28 M: a 20 s
# window padded to 30 s; a 3 s window padded to 5 s costs 0.3 M) and the signatures few.
AUDIO_CLASSES_S = (5, 12, 30)


class EncoderGraph(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, mel: Tensor) -> dict[str, Tensor]:
        pairs = self.decoder.cross_kv(self.encoder(mel))
        names = cache_names("cross", len(pairs))
        return dict(zip(names, [t for pair in pairs for t in pair]))


class DecoderStepGraph(nn.Module):
    """`n_tokens` decoding steps at once over a fixed-length cache (1: a step; more: a chunk of a prompt);
    see the module docstring for the protocol."""

    def __init__(self, model: Whisper, max_tokens: int = MAX_TOKENS, n_tokens: int = 1, padded: bool = False):
        super().__init__()
        self.decoder = model.decoder
        self.max_tokens, self.n_tokens, self.padded = max_tokens, n_tokens, padded
        self.n_layer = len(model.decoder.blocks)

    def forward(self, token: Tensor, position: Tensor, *caches: Tensor) -> dict[str, Tensor]:
        n = 2 * self.n_layer
        cache, cross = caches[:n], caches[n : 2 * n]
        cross_mask = None
        if self.padded:  # the last input: the window's own audio positions; the padding after them is masked
            audio_positions = caches[2 * n]
            cross_mask = torch.where(torch.arange(cross[1].shape[-2]) < audio_positions, 0.0, MASKED)
        d = self.decoder
        positions = position + torch.arange(self.n_tokens)  # (n_tokens,)
        x = d.token_embedding.embed(token.long()) + d.positional_embedding.index_select(0, positions.long())[None]
        slots = torch.arange(self.max_tokens)
        written = slots == positions[:, None]  # (n_tokens, slots): the slot each token's key and value go to
        mask = torch.where(slots > positions[:, None], MASKED, 0.0)  # each token sees the slots up to its own
        out = {}
        for i, block in enumerate(d.blocks):
            h = block.attn_ln(x)
            k_t, v = block.attn.project_key_value(h)  # (1, H, qk, n_tokens), (1, H, n_tokens, vo)
            keys, values = self._written(written, k_t, v, cache[2 * i], cache[2 * i + 1])
            x = x + block.attn.attend(block.attn.project_query(h), keys, values, mask)
            c = block.cross_attn
            x = x + c.attend(c.project_query(block.cross_attn_ln(x)), cross[2 * i], cross[2 * i + 1], cross_mask)
            x = x + block.mlp(block.mlp_ln(x))
            out[f"k_{i}"], out[f"v_{i}"] = k_t, v
        return {"logits": d.token_embedding.logits(d.ln(x[:, -1])), **out}

    def _written(self, written: Tensor, k_t: Tensor, v: Tensor, cached_k: Tensor, cached_v: Tensor):
        """The cache with the new tokens' keys and values in their slots."""
        if self.n_tokens == 1:  # broadcast over the slot axis: the one-token graph as it was before chunks
            return torch.where(written, k_t, cached_k), torch.where(written.T, v, cached_v)
        # One-hot products place each token's key and value in its slot (exact: every other term is zero).
        placed = written.to(k_t.dtype)
        any_written = written.any(0)
        return (
            torch.where(any_written, k_t @ placed, cached_k),
            torch.where(any_written[:, None], placed.T @ v, cached_v),
        )


class RowsFactoredEmbedding(nn.Module):
    """A factored token embedding (`compress.FactoredTokenEmbedding`) with its tables as rows (n, dim), the
    layout of FULLY_CONNECTED weights and of gather tables alike, so that the output projection's weights
    and the lookup's table are one tensor each, which the quantizer stores once in int8."""

    def __init__(self, embedding):
        super().__init__()
        self.exact = nn.Parameter(embedding.exact_t.detach().t().contiguous())  # (n_exact, n_state)
        self.tail = nn.Parameter(embedding.tail_t.detach().t().contiguous())  # (n_tail, rank)
        self.down = nn.Parameter(embedding.tail_proj.detach().t().contiguous())  # (rank, n_state)
        self.up = nn.Parameter(embedding.tail_proj.detach().clone())  # (n_state, rank)
        self.register_buffer("position", embedding.position.clone())
        self.n_exact = embedding.n_exact

    def embed(self, tokens: Tensor) -> Tensor:
        position = self.position[tokens.reshape(-1)]
        exact = self.exact.index_select(0, position.clamp(max=self.n_exact - 1))
        tail = F.linear(self.tail.index_select(0, (position - self.n_exact).clamp(min=0)), self.up)
        rows = torch.where((position >= self.n_exact)[:, None], tail, exact)
        return rows.reshape(*tokens.shape, -1)

    def logits(self, x: Tensor) -> Tensor:
        return torch.cat([F.linear(x, self.exact), F.linear(F.linear(x, self.down), self.tail)], dim=-1).index_select(
            -1, self.position
        )


@contextlib.contextmanager
def _quiet():
    """litert-torch prints a progress line per conversion stage, and TensorFlow's and absl's C++ logging
    write to the process' stderr at import and conversion: the build step shows its own progress, so both
    file descriptors point at a scratch file meanwhile (replayed if the conversion fails)."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # litert-torch's enum registrations
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
                torch.no_grad(),
            ):
                warnings.simplefilter("ignore")
                yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read()[-4000:].decode(errors="replace"))


def _converter():
    try:
        import litert_torch
    except ImportError:
        from edge_asr.errors import EdgeAsrError

        raise EdgeAsrError("TFLite export needs litert-torch: pip install 'edge-asr[tflite-build]'") from None
    return litert_torch


def convert_signatures(signatures: list[tuple[str, nn.Module, dict[str, Tensor]]], path: Path) -> Path:
    with _quiet():
        litert_torch = _converter()  # imported quietly: TensorFlow's C++ logging is set up at import
        converter = None
        for name, module, kwargs in signatures:
            target = litert_torch if converter is None else converter
            converter = target.signature(name, module.eval(), sample_kwargs=kwargs)
        converter.convert().export(str(path))
    return Path(path)


def whisper_decoder_inputs(
    model: Whisper, max_tokens: int = MAX_TOKENS, n_audio: int | None = None
) -> dict[str, Tensor]:
    dims = model.dims
    n_audio = n_audio or dims.n_audio_ctx
    inputs = {"token": torch.zeros(1, 1, dtype=torch.int32), "position": torch.zeros(1, dtype=torch.int32)}
    for i, block in enumerate(model.decoder.blocks):
        a = block.attn
        inputs[f"self_k_{i}"] = torch.zeros(1, a.n_head, a.qk_dim, max_tokens)
        inputs[f"self_v_{i}"] = torch.zeros(1, a.n_head, max_tokens, a.vo_dim)
    for i, block in enumerate(model.decoder.blocks):
        c = block.cross_attn
        inputs[f"cross_k_{i}"] = torch.zeros(1, c.n_head, c.qk_dim, n_audio)
        inputs[f"cross_v_{i}"] = torch.zeros(1, c.n_head, n_audio, c.vo_dim)
    return inputs


class Keywords(nn.Module):
    """Calls a graph whose inputs are positional with the named inputs TFLite signatures are made from."""

    def __init__(self, inner: nn.Module, names: list[str]):
        super().__init__()
        self.inner, self.names = inner, names  # not `graph`: torch.export's GraphModule owns that name

    def forward(self, **inputs: Tensor):
        return self.inner(*(inputs[n] for n in self.names))


def encoder_signature(frames: int) -> str:
    return f"encode_{frames}"


def chunk_signature(positions: int) -> str:
    """The decoder signature that takes PROMPT_CHUNK tokens at once, for windows of `positions` audio positions."""
    return f"prefill_{positions}"


def decoder_signature(positions: int) -> str:
    """The decoder signature for windows of `positions` audio positions (mel frames / 2)."""
    return f"decode_{positions}"


def audio_classes(bucket_frames: list[int]) -> tuple[list[int], bool]:
    """The decoder signatures' audio positions: per class of AUDIO_CLASSES_S, the longest window that fits
    in it; and whether some window is shorter than its class (then every signature takes `audio_positions`).
    The longest window is always a class, so every window has one."""
    positions = sorted({frames // 2 for frames in bucket_frames})
    per_second = FRAMES_PER_SECOND // 2
    classes = sorted(
        {max(p for p in positions if p <= s * per_second) for s in AUDIO_CLASSES_S if positions[0] <= s * per_second}
    )
    return classes, any(p not in classes for p in positions)


def export_whisper_tflite(
    model: Whisper, out_dir: Path, max_tokens: int = MAX_TOKENS, bucket_frames: list[int] = (3000,), jobs: int = 1
) -> dict[str, Path]:
    """encoder.tflite and decoder.tflite (float32) in `out_dir`.

    The encoder has one signature per window length in `bucket_frames` ("encode_<frames>"), the decoder two
    per audio class ("decode_<positions>", "prefill_<positions>"), each file over one copy of the weights. The
    token embedding stays (n_vocab, n_state), unlike the ONNX graphs' transposed copy: the output projection is
    then a FULLY_CONNECTED op, which the quantizer stores as int8 per vocabulary row.

    With `jobs` > 1 the encoder is converted in a process of its own while this one converts the decoder: the
    converter runs on one core, and the two files share nothing. The default bundle's eight encoder and six
    decoder signatures take about a minute each."""

    model = copy.deepcopy(model).eval()
    if isinstance(model.decoder.token_embedding, FactoredTokenEmbedding):
        model.decoder.token_embedding = RowsFactoredEmbedding(model.decoder.token_embedding)
    out_dir = Path(out_dir)
    encoder_args = (model, list(bucket_frames), out_dir / "encoder.tflite")
    decoder_args = (model, max_tokens, list(bucket_frames), out_dir / "decoder.tflite")
    if jobs > 1:
        spawn = multiprocessing.get_context("spawn")  # not fork: this process's OpenMP threads do not survive one
        with ProcessPoolExecutor(1, mp_context=spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            encoder = pool.submit(encoder_tflite, *encoder_args)
            decoder = decoder_tflite(*decoder_args)
            return {"encoder": encoder.result(), "decoder": decoder}
    return {"encoder": encoder_tflite(*encoder_args), "decoder": decoder_tflite(*decoder_args)}


def encoder_tflite(model: Whisper, bucket_frames: list[int], path: Path) -> Path:
    graph = Keywords(EncoderGraph(model), ["mel"])
    signatures = [(encoder_signature(f), graph, {"mel": torch.zeros(1, model.dims.n_mels, f)}) for f in bucket_frames]
    return convert_signatures(signatures, path)


def decoder_tflite(model: Whisper, max_tokens: int, bucket_frames: list[int], path: Path) -> Path:
    classes, padded = audio_classes(bucket_frames)
    step = DecoderStepGraph(model, max_tokens, padded=padded)
    chunk = DecoderStepGraph(model, max_tokens, PROMPT_CHUNK, padded=padded)
    signatures = []
    for positions in classes:
        inputs = whisper_decoder_inputs(model, max_tokens, positions)
        if padded:
            inputs["audio_positions"] = torch.full((1,), positions, dtype=torch.int32)
        signatures.append((decoder_signature(positions), Keywords(step, list(inputs)), inputs))
        chunk_inputs = {**inputs, "token": torch.zeros(1, PROMPT_CHUNK, dtype=torch.int32)}
        signatures.append((chunk_signature(positions), Keywords(chunk, list(chunk_inputs)), chunk_inputs))
    return convert_signatures(signatures, path)


def quantize_tflite_int8(source: Path, target: Path, bits: int = 8) -> Path:
    """int8 weights (per output channel) with float activations quantized on the fly, by ai-edge-quantizer;
    with `bits=4`, int4 weights in blocks of 32 (its dynamic_wi4b32 recipe; per output channel where a width
    is not divisible by 32)."""
    with _quiet():
        try:
            from ai_edge_quantizer import quantizer, recipe
        except ImportError:
            from edge_asr.errors import EdgeAsrError

            raise EdgeAsrError(
                f"TFLite int{bits} needs ai-edge-quantizer: pip install 'edge-asr[tflite-build]'"
            ) from None
        q = quantizer.Quantizer(str(source))
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32() if bits == 8 else recipe.dynamic_wi4b32_afp32())
        try:
            result = q.quantize()
        except ValueError:
            if bits == 8:
                raise
            # Blocks of 32 need every input width divisible by 32; a factored head width (6 heads x 40)
            # may not be: then int4 per output channel.
            q = quantizer.Quantizer(str(source))
            q.load_quantization_recipe(recipe.dynamic_wi4c_afp32())
            result = q.quantize()
        write_in_pieces(Path(target), result.quantized_model)
    return Path(target)
