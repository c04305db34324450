"""LiteRT (TensorFlow Lite) backends: the same interfaces as the ONNX Runtime ones in `backend.py`, for
devices that run ai-edge-litert or tflite-runtime instead (armv7 has no onnxruntime wheel).

The graphs have static shapes (see the build step's `tflite_export`): Whisper's decoder takes one token
per call over a fixed number of cache slots (and, in bundles since prompt chunks, a prompt 8 tokens per
call: CompiledModel API only), and the LSTM graph has a one-step and a chunk signature.

Whisper runs on ai-edge-litert's CompiledModel API where it exists: its XNNPACK weight cache packs the
weights a file's signatures share once, where the Interpreter API packs them again for every signature.
A dynamic-context bundle has eight window lengths, so that is 114 MB loaded instead of 400
(`benchmarks/memory.py`); and the packed weights are kept on disk from one run to the next
(`weight_cache`), so that a run maps them instead of packing them. tflite-runtime (armv7) has only the
Interpreter API, which `InterpreterWhisper` serves.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys

import numpy as np

from .bundle import Bundle
from .errors import BundleError, EdgeAsrError
from .threads import resolve_threads
from .weight_cache import WeightCache

CHUNK_PREFIX = "prefill_"  # decoder signatures that take a prompt several tokens at a time


def interpreter_class():
    """LiteRT's interpreter from whichever package is installed: ai-edge-litert (current) or tflite-runtime
    (the older name, the one with armv7 wheels)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise EdgeAsrError(
                "the tflite backend needs a LiteRT interpreter: pip install 'edge-asr[tflite]' "
                "(ai-edge-litert), or tflite-runtime"
            ) from None
    return Interpreter


def compiled_model_api():
    """ai-edge-litert's CompiledModel module, or None where only the Interpreter API is installed."""
    try:
        from ai_edge_litert import compiled_model
    except ImportError:
        return None
    return compiled_model


def available() -> bool:
    try:
        interpreter_class()
    except EdgeAsrError:
        return False
    return True


@contextlib.contextmanager
def _stderr_silenced():
    """LiteRT's C++ side announces its XNNPACK delegate on the process' stderr; the runtime keeps a quiet
    console (errors still arrive as Python exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _interpreter(path, threads: int | None):
    Interpreter = interpreter_class()
    try:
        with _stderr_silenced():
            interpreter = Interpreter(model_path=str(path), num_threads=resolve_threads(threads))
            interpreter.allocate_tensors()  # where LiteRT applies its default delegate, and says so
            return interpreter
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: LiteRT cannot load this model ({str(e).splitlines()[0][:160]})") from None


class _DecoderSignature:
    """One decoder signature's tensors (a subgraph of its own: inputs, outputs and the cache they hold)."""

    def __init__(self, interpreter, name: str):
        runner = interpreter.get_signature_runner(name)
        self.subgraph = runner._subgraph_index  # noqa: SLF001 (LiteRT exposes no public getter)
        details = runner.get_input_details()
        self.inputs = {n: d["index"] for n, d in details.items()}
        self.outputs = {n: d["index"] for n, d in runner.get_output_details().items()}
        self.max_tokens = int(details["self_k_0"]["shape"][-1])
        self.n_audio = int(details["cross_v_0"]["shape"][-2])


@functools.lru_cache(maxsize=1)
def _environment():
    """One LiteRT environment for the process. It logs each accelerator it releases, so it lives until the
    process ends, and by then stderr is closed to it: atexit handlers run after Python's own last words."""
    from ai_edge_litert.environment import Environment

    atexit.register(_silence_stderr)
    return Environment.create(runtime_path=os.path.dirname(compiled_model_api().__file__))


def _silence_stderr() -> None:
    sys.stderr.flush()
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)


def _window_frames(signature: str) -> int:
    """The mel frames of an encoder signature's window ("encode" alone: a bundle from before buckets, 30 s)."""
    return 3000 if signature == "encode" else int(signature.rsplit("_", 1)[1])


def _read(buffer, shape) -> np.ndarray:
    return buffer.read(int(np.prod(shape)), np.float32).reshape(shape)


def _positions_axis(name: str) -> int:
    """The axis of a key or value tensor (self or cross) that runs over positions: keys are stored
    transposed (positions last), values are not (positions second to last)."""
    return -1 if "_k_" in name else -2


def _slots(name: str, cache: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Cache slots start..stop of a self-attention key or value."""
    return cache[..., start:stop] if _positions_axis(name) == -1 else cache[..., start:stop, :]


def _audio_class(classes: list[int], padded: bool, positions: int) -> int:
    """The decoder signature's audio positions for a window of `positions`: its own length, or, in a decoder
    whose signatures take `audio_positions`, the shortest class that holds it."""
    if positions in classes:
        return positions
    if padded and positions <= max(classes):
        return min(c for c in classes if c >= positions)
    raise EdgeAsrError(f"this TFLite decoder takes {sorted(classes)} audio positions, not {positions}")


def _padded_cross(name: str, value: np.ndarray, positions: int) -> np.ndarray:
    """A window's cross-attention key or value, zero-padded to `positions`; the decoder masks the padding."""
    axis = _positions_axis(name)
    pad = positions - value.shape[axis]
    if pad == 0:
        return np.ascontiguousarray(value, dtype=np.float32)
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, pad)
    return np.pad(value.astype(np.float32, copy=False), widths)


def whisper_model(bundle: Bundle, threads: int | None = None):
    """Whisper on LiteRT through the best API installed."""
    return (CompiledWhisper if compiled_model_api() else InterpreterWhisper)(bundle, threads)


class _DecoderBuffers:
    """The token, position and cache input buffers and the output buffers of a decoder signature, shared by
    the signatures of every window length that take as many tokens per run; `bind` adds a window's
    cross-attention buffers and picks its signature (None: this window has none)."""

    def __init__(self, model, name: str, cache_names: list[str]):
        self.tokens = int(model.get_input_tensor_details(name)["token"]["shape"][-1])
        self.inputs = {n: model.create_input_buffer_by_name(name, n) for n in ("token", "position", *cache_names)}
        self.outputs = {
            n: model.create_output_buffer_by_name(name, n) for n in model.get_signature_list()[name]["outputs"]
        }
        self.shapes = {n: d["shape"] for n, d in model.get_output_tensor_details(name).items()}
        self.run = None  # (signature index, input buffers, output buffers) of the window fed last

    def bind(self, model, name: str | None, cross_buffers: dict) -> None:
        if name is None:
            self.run = None
            return
        buffers, io = {**cross_buffers, **self.inputs}, model.get_signature_list()[name]
        self.run = (
            model.get_signature_index(name),
            [buffers[n] for n in io["inputs"]],
            [self.outputs[n] for n in io["outputs"]],
        )

    def output(self, name: str) -> np.ndarray:
        return _read(self.outputs[name], self.shapes[name])


class CompiledWhisper:
    """Encoder and one-token decoder on LiteRT's CompiledModel API, with the protocol of
    `InterpreterWhisper` (below): the runtime keeps the decoder's self-attention cache and writes each
    step's new key and value into slot `position`. The API's tensor buffers are written and read whole
    (no views), so a step copies the cache in (8 x 356 KB for tiny.en), which costs well under a
    millisecond. Beam search runs the beams one after another, each from cache rows of its own."""

    backend = "tflite"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        api = compiled_model_api()
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        def load(role: str):
            path = bundle.file(role, "tflite")
            cache = WeightCache(bundle.manifest.files[path.name].sha256)
            options = Options(
                hardware_accelerators=HardwareAccelerator.CPU,
                cpu_options=CpuOptions(num_threads=resolve_threads(threads), xnnpack_weight_cache_path=cache.path),
            )
            try:
                model = self._load(api, path, _environment(), options)
            except BundleError:
                cache.discard()
                raise
            cache.keep()
            return model

        with _stderr_silenced():  # LiteRT logs its accelerator discovery on the process' stderr
            self.encoder, self.decoder = load("encoder"), load("decoder")
        self._encoders = {_window_frames(name): name for name in self.encoder.get_signature_list()}
        self._decoders, self._chunks = {}, {}  # audio positions -> step / prompt-chunk signature name
        for name in self.decoder.get_signature_list():
            positions = int(self.decoder.get_input_tensor_details(name)["cross_v_0"]["shape"][-2])
            (self._chunks if name.startswith(CHUNK_PREFIX) else self._decoders)[positions] = name
        first = next(name for name in self.decoder.get_signature_list() if not name.startswith(CHUNK_PREFIX))
        inputs = self.decoder.get_input_tensor_details(first)
        self._padded = "audio_positions" in inputs  # decoders since audio classes (see `_audio_class`)
        self.n_layer = sum(name.startswith("self_k_") for name in inputs)
        self.cross_names = [f"cross_{kind}_{i}" for i in range(self.n_layer) for kind in ("k", "v")]
        self.cache_names = [f"self_{kind}_{i}" for i in range(self.n_layer) for kind in ("k", "v")]
        self.max_tokens = int(inputs["self_k_0"]["shape"][-1])
        self._cache = {name: np.zeros(inputs[name]["shape"], np.float32) for name in self.cache_names}
        # Every one-token signature has the same token, position, cache and output shapes: one set of buffers
        # serves all; so for the prompt-chunk signatures (none in a bundle from before them: its prompts go
        # a token at a time).
        with _stderr_silenced():
            self._step_io = _DecoderBuffers(self.decoder, first, self.cache_names)
            self._chunk_io = (
                _DecoderBuffers(self.decoder, next(iter(self._chunks.values())), self.cache_names)
                if self._chunks
                else None
            )
        self._fed_cross = None

    @staticmethod
    def _load(api, path, environment, options):
        try:
            return api.CompiledModel.from_file(str(path), environment=environment, options=options)
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: LiteRT cannot load this model ({str(e).splitlines()[0][:160]})") from None

    def encode(self, mel: np.ndarray) -> list[np.ndarray]:
        name = self._encoders.get(mel.shape[-1])
        if name is None:
            raise EdgeAsrError(
                f"this TFLite encoder takes windows of {sorted(self._encoders)} frames, "
                f"not {mel.shape[-1]}: the bundle's context policy and its models disagree"
            )
        index = self.encoder.get_signature_index(name)
        with _stderr_silenced():  # the first run sets up LiteRT's accelerators, which log each one
            inputs, outputs = self.encoder.create_input_buffers(index), self.encoder.create_output_buffers(index)
            inputs[0].write(np.ascontiguousarray(mel[None], dtype=np.float32))
            self.encoder.run_by_index(index, inputs, outputs)
        details = self.encoder.get_output_tensor_details(name)
        out = {
            n: _read(b, details[n]["shape"])
            for n, b in zip(self.encoder.get_signature_list()[name]["outputs"], outputs)
        }
        return [out[n] for n in self.cross_names]

    def empty_cache(self) -> int:
        """The cache is the runtime's; what the decoder carries is the number of slots filled."""
        return 0

    def _feed(self, cross: list[np.ndarray]) -> None:
        """Write a window's cross-attention keys and values, and pick the decoder signature for its length."""
        positions = _audio_class(list(self._decoders), self._padded, cross[1].shape[-2])
        name = self._decoders[positions]
        cross_buffers = {}
        for n, value in zip(self.cross_names, cross):
            cross_buffers[n] = self.decoder.create_input_buffer_by_name(name, n)
            cross_buffers[n].write(_padded_cross(n, value, positions))
        if self._padded:
            cross_buffers["audio_positions"] = self.decoder.create_input_buffer_by_name(name, "audio_positions")
            cross_buffers["audio_positions"].write(np.array([cross[1].shape[-2]], np.int32))
        self._step_io.bind(self.decoder, name, cross_buffers)
        if self._chunk_io is not None:  # the same cross-attention buffers serve both signatures: written once
            self._chunk_io.bind(self.decoder, self._chunks.get(positions), cross_buffers)
        self._fed_cross = cross

    def _run(self, io: _DecoderBuffers, tokens: list[int], position: int) -> None:
        """One decoder run of `io`'s signature: `tokens` at slots `position`…, attending to the runtime's
        cache arrays' slots before them (later slots are masked, whatever they hold)."""
        if position + len(tokens) > self.max_tokens:
            raise EdgeAsrError(f"the TFLite decoder holds {self.max_tokens} tokens per window")
        io.inputs["token"].write(np.array([tokens], np.int32))
        io.inputs["position"].write(np.array([position], np.int32))
        for name in self.cache_names:
            io.inputs[name].write(self._cache[name])
        self.decoder.run_by_index(*io.run)

    def decode(self, tokens: list[int], position: int, cross: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """Logits (n_vocab,) after the last of `tokens`, and the number of slots filled after them: a prompt
        a chunk at a time where the window has a chunk signature, the rest a token at a time."""
        if cross is not self._fed_cross:
            self._feed(cross)
        chunk, io, start = self._chunk_io, self._step_io, 0
        while start < len(tokens):
            whole_chunk = chunk is not None and chunk.run is not None and len(tokens) - start >= chunk.tokens
            io = chunk if whole_chunk else self._step_io
            self._run(io, tokens[start : start + io.tokens], position)
            for name in self.cache_names:  # the run's new keys or values (outputs k_0, v_0, …) into their slots
                _slots(name, self._cache[name], position, position + io.tokens)[...] = io.output(
                    name.removeprefix("self_")
                )
            start, position = start + io.tokens, position + io.tokens
        return io.output("logits")[0], position

    def select_beams(self, cache, sources: list[int]) -> list[np.ndarray]:
        """The caches of beams that extend beams `sources`. Beams carry their own caches, flat as ONNX's
        ([k_0, v_0, …] with the beams first and the filled slots only); right after prefill, `cache` is the
        number of slots filled, and every beam starts from the runtime's cache."""
        if isinstance(cache, int):
            cache = [_slots(name, self._cache[name], 0, cache) for name in self.cache_names]
        return [c[sources] for c in cache]

    def decode_batch(self, tokens: np.ndarray, cache: list[np.ndarray], cross: list[np.ndarray]):
        """One new token per beam (tokens (beams, 1)), the beams one after another through the decoder:
        logits (beams, n_vocab) and the beams' caches one slot longer. `cross` is the window's (batch 1),
        the same for every beam."""
        if cross is not self._fed_cross:
            self._feed(cross)
        position = cache[0].shape[-1]
        logits, new = [], [[] for _ in cache]
        for beam, token in enumerate(np.asarray(tokens)[:, -1]):
            for name, c in zip(self.cache_names, cache):  # the runtime's cache arrays are this beam's scratch
                _slots(name, self._cache[name], 0, position)[...] = c[beam]
            self._run(self._step_io, [token], position)
            logits.append(self._step_io.output("logits")[0])
            for rows, name in zip(new, self.cache_names):
                rows.append(self._step_io.output(name.removeprefix("self_")))
        cache = [
            np.concatenate([c, np.concatenate(rows)], axis=_positions_axis(name))
            for name, c, rows in zip(self.cache_names, cache, new)
        ]
        return np.stack(logits), cache


class InterpreterWhisper:
    """Encoder and one-token decoder. The decoder's self-attention cache lives in the interpreter's own
    input tensors: each step writes the new token's key and value into its slot, so nothing else is copied;
    the cross-attention keys and values are written once per window. The cache being the interpreter's,
    it holds one decoding path at a time, which is what greedy decoding needs.

    The encoder has one signature per window length (bundles from before context policies have a single
    "encode" / "decode" for 30 s windows), the decoder one per audio class (one per window length in
    bundles from before classes). A window's length picks the encoder signature, and its cross keys and
    values, padded to their class, the decoder signature. Each decoder signature is a subgraph with its own tensors,
    reached through the interpreter's wrapper, since LiteRT's public `tensor()` view and `invoke()` only
    serve the first subgraph."""

    backend = "tflite"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        encoder = _interpreter(bundle.file("encoder", "tflite"), threads)
        self.encoders = {}
        for name in encoder.get_signature_list():
            self.encoders[_window_frames(name)] = encoder.get_signature_runner(name)
        self.interpreter = _interpreter(bundle.file("decoder", "tflite"), threads)
        self._wrapper = self.interpreter._interpreter  # noqa: SLF001
        # Prompt-chunk signatures are left to the CompiledModel API: here each signature holds its own cache.
        signatures = [
            _DecoderSignature(self.interpreter, name)
            for name in self.interpreter.get_signature_list()
            if not name.startswith(CHUNK_PREFIX)
        ]
        self.decoders = {signature.n_audio: signature for signature in signatures}
        self._padded = "audio_positions" in signatures[0].inputs
        self._allocated: set[int] = set()  # subgraphs get their tensors when a window first needs them
        first = signatures[0]
        self.n_layer = sum(name.startswith("self_k_") for name in first.inputs)
        self.cross_names = [f"cross_{kind}_{i}" for i in range(self.n_layer) for kind in ("k", "v")]
        self.max_tokens = first.max_tokens
        self._fed_cross = None
        self._signature = first

    def _allocate(self, signature: _DecoderSignature) -> None:
        self._wrapper.AllocateTensors(signature.subgraph)
        self._allocated.add(signature.subgraph)
        # Allocated tensors hold whatever the memory held. Masked slots get zero attention weight, but zero
        # times a NaN left there is still NaN: the caches start as zeros, and later hold only finite values.
        for name, index in signature.inputs.items():
            if name.startswith("self_"):
                self._view(signature, index).fill(0)

    def _view(self, signature: _DecoderSignature, index: int) -> np.ndarray:
        # A view of the input buffer, dropped before the next invoke (LiteRT refuses to run while one is held).
        return self._wrapper.tensor(self._wrapper, index, signature.subgraph)

    def encode(self, mel: np.ndarray) -> list[np.ndarray]:
        runner = self.encoders.get(mel.shape[-1])
        if runner is None:
            raise EdgeAsrError(
                f"this TFLite encoder takes windows of {sorted(self.encoders)} frames, "
                f"not {mel.shape[-1]}: the bundle's context policy and its models disagree"
            )
        out = runner(mel=np.ascontiguousarray(mel[None], dtype=np.float32))
        return [out[name] for name in self.cross_names]

    def empty_cache(self) -> int:
        """The cache is the interpreter's; what the decoder carries is the number of slots filled."""
        return 0

    def decode(self, tokens: list[int], position: int, cross: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """Logits (n_vocab,) after the last of `tokens`, and the number of slots filled after them."""
        wrapper = self._wrapper
        if cross is not self._fed_cross:
            positions = _audio_class(list(self.decoders), self._padded, cross[1].shape[-2])
            signature = self.decoders[positions]
            if signature.subgraph not in self._allocated:
                self._allocate(signature)
            for name, value in zip(self.cross_names, cross):
                wrapper.SetTensor(signature.inputs[name], _padded_cross(name, value, positions), signature.subgraph)
            if self._padded:
                audio_positions = np.array([cross[1].shape[-2]], np.int32)
                wrapper.SetTensor(signature.inputs["audio_positions"], audio_positions, signature.subgraph)
            self._signature, self._fed_cross = signature, cross
        signature = self._signature
        for token in tokens:
            if position >= self.max_tokens:
                raise EdgeAsrError(f"the TFLite decoder holds {self.max_tokens} tokens per window")
            wrapper.SetTensor(signature.inputs["token"], np.array([[token]], dtype=np.int32), signature.subgraph)
            wrapper.SetTensor(signature.inputs["position"], np.array([position], dtype=np.int32), signature.subgraph)
            wrapper.Invoke(signature.subgraph)
            for i in range(self.n_layer):
                key = wrapper.GetTensor(signature.outputs[f"k_{i}"], signature.subgraph)
                value = wrapper.GetTensor(signature.outputs[f"v_{i}"], signature.subgraph)
                self._view(signature, signature.inputs[f"self_k_{i}"])[..., position] = key[..., 0]
                self._view(signature, signature.inputs[f"self_v_{i}"])[..., position, :] = value[..., 0, :]
            position += 1
        return wrapper.GetTensor(signature.outputs["logits"], signature.subgraph)[0], position


class TfliteLstmCtc:
    """features (T, n_mels) + state -> log-probabilities (T // stack, n_symbols) + the state after them,
    as `OnnxLstmCtc`: whole chunks through the "chunk" signature, the rest one step at a time."""

    backend = "tflite"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        interpreter = _interpreter(bundle.file("acoustic", "tflite"), threads)
        self.chunk = interpreter.get_signature_runner("chunk")
        self.step = interpreter.get_signature_runner("step")
        details = self.step.get_input_details()
        self.stack = bundle.manifest.frontend.stack
        self.chunk_frames = int(self.chunk.get_input_details()["features"]["shape"][0])
        n_layers = sum(name.startswith("h") for name in details)
        self.state_names = bundle.manifest.model.state or [f"{kind}{i}" for i in range(n_layers) for kind in ("h", "c")]
        self._initial = [np.zeros(details[n]["shape"], dtype=np.float32) for n in self.state_names]
        self.n_symbols = int(self.step.get_output_details()["log_probs"]["shape"][-1])

    def initial_state(self) -> list[np.ndarray]:
        return list(self._initial)

    def run(self, features: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        features = np.ascontiguousarray(features, dtype=np.float32)
        log_probs, start = [], 0
        while start < len(features):
            whole_chunk = len(features) - start >= self.chunk_frames
            runner, size = (self.chunk, self.chunk_frames) if whole_chunk else (self.step, self.stack)
            out = runner(features=features[start : start + size], **dict(zip(self.state_names, state)))
            log_probs.append(out["log_probs"])
            state = [out[n] for n in self.state_names]
            start += size
        return (np.concatenate(log_probs) if log_probs else np.zeros((0, self.n_symbols), np.float32)), state
