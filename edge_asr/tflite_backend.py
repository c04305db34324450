"""LiteRT (TensorFlow Lite) backends: the same interfaces as the ONNX Runtime ones in `backend.py`, for
devices that run ai-edge-litert or tflite-runtime instead (armv7 has no onnxruntime wheel).

The graphs have static shapes (see the build step's `tflite_export`): Whisper's decoder takes one token
per call over a fixed number of cache slots, and the LSTM graph has a one-step and a chunk signature.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from .bundle import Bundle
from .errors import BundleError, EdgeAsrError
from .threads import resolve_threads


def interpreter_class():
    """LiteRT's interpreter from whichever package is installed: ai-edge-litert (current) or tflite-runtime
    (the older name, the one with armv7 wheels)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise EdgeAsrError("the tflite backend needs a LiteRT interpreter: pip install 'edge-asr[tflite]' "
                               "(ai-edge-litert), or tflite-runtime") from None
    return Interpreter


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


class TfliteWhisper:
    """Encoder and one-token decoder. The decoder's self-attention cache lives in the interpreter's own
    input tensors: each step writes the new token's key and value into its slot, so nothing else is copied;
    the cross-attention keys and values are written once per window. The cache being the interpreter's,
    it holds one decoding path at a time, which is what greedy decoding needs.

    Both models have one signature per window length (bundles from before context policies have a single
    "encode" / "decode" for 30 s windows). A window's length picks the encoder signature, and its cross
    keys and values, the decoder signature. Each decoder signature is a subgraph with its own tensors,
    reached through the interpreter's wrapper, since LiteRT's public `tensor()` view and `invoke()` only
    serve the first subgraph."""

    backend = "tflite"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        encoder = _interpreter(bundle.file("encoder", "tflite"), threads)
        self.encoders = {}
        for name in encoder.get_signature_list():
            frames = 3000 if name == "encode" else int(name.rsplit("_", 1)[1])
            self.encoders[frames] = encoder.get_signature_runner(name)
        self.interpreter = _interpreter(bundle.file("decoder", "tflite"), threads)
        self._wrapper = self.interpreter._interpreter  # noqa: SLF001
        signatures = [_DecoderSignature(self.interpreter, name) for name in self.interpreter.get_signature_list()]
        self.decoders = {signature.n_audio: signature for signature in signatures}
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
            raise EdgeAsrError(f"this TFLite encoder takes windows of {sorted(self.encoders)} frames, "
                               f"not {mel.shape[-1]}: the bundle's context policy and its models disagree")
        out = runner(mel=np.ascontiguousarray(mel[None], dtype=np.float32))
        return [out[name] for name in self.cross_names]

    def empty_cache(self) -> int:
        """The cache is the interpreter's; what the decoder carries is the number of slots filled."""
        return 0

    def decode(self, tokens: list[int], position: int, cross: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """Logits (n_vocab,) after the last of `tokens`, and the number of slots filled after them."""
        wrapper = self._wrapper
        if cross is not self._fed_cross:
            signature = self.decoders.get(cross[1].shape[-2])
            if signature is None:
                raise EdgeAsrError(f"this TFLite decoder takes {sorted(self.decoders)} audio positions, "
                                   f"not {cross[1].shape[-2]}")
            if signature.subgraph not in self._allocated:
                self._allocate(signature)
            for name, value in zip(self.cross_names, cross):
                wrapper.SetTensor(signature.inputs[name], value, signature.subgraph)
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
        self.stack = int(bundle.manifest["frontend"]["stack"])
        self.chunk_frames = int(self.chunk.get_input_details()["features"]["shape"][0])
        n_layers = sum(name.startswith("h") for name in details)
        self.state_names = bundle.manifest["model"].get("state") or [f"{kind}{i}" for i in range(n_layers)
                                                                     for kind in ("h", "c")]
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
            out = runner(features=features[start:start + size], **dict(zip(self.state_names, state)))
            log_probs.append(out["log_probs"])
            state = [out[n] for n in self.state_names]
            start += size
        return (np.concatenate(log_probs) if log_probs else np.zeros((0, self.n_symbols), np.float32)), state
