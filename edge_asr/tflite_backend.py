"""LiteRT (TensorFlow Lite) backends: the same interfaces as the ONNX Runtime ones in `backend.py`, for
devices that run ai-edge-litert or tflite-runtime instead (armv7 has no onnxruntime wheel).

The graphs have static shapes (see the build step's `tflite_export`): Whisper's decoder takes one token
per call over a fixed number of cache slots, and the LSTM graph has a one-step and a chunk signature.
"""
from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .errors import BundleError, EdgeAsrError


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


def _interpreter(path, threads: int):
    Interpreter = interpreter_class()
    try:
        return Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: LiteRT cannot load this model ({str(e).splitlines()[0][:160]})") from None


class TfliteWhisper:
    """Encoder and one-token decoder. The decoder's self-attention cache lives in the interpreter's own
    input tensors: each step writes the new token's key and value into its slot, so nothing else is copied;
    the cross-attention keys and values are written once per window. The cache being the interpreter's,
    it holds one decoding path at a time, which is what greedy decoding needs."""

    backend = "tflite"

    def __init__(self, bundle: Bundle, threads: int = 2):
        # One encoder signature per window length ("encode_<frames>"; bundles from before context policies
        # have a single "encode" for 3000 frames), all over one copy of the weights.
        encoder = _interpreter(bundle.file("encoder", "tflite"), threads)
        self.encoders = {}
        for name in encoder.get_signature_list():
            frames = 3000 if name == "encode" else int(name.rsplit("_", 1)[1])
            self.encoders[frames] = encoder.get_signature_runner(name)
        self.interpreter = _interpreter(bundle.file("decoder", "tflite"), threads)
        self.interpreter.allocate_tensors()
        runner = self.interpreter.get_signature_runner("decode")
        self.inputs = {name: d["index"] for name, d in runner.get_input_details().items()}
        self.outputs = {name: d["index"] for name, d in runner.get_output_details().items()}
        self.n_layer = sum(name.startswith("self_k_") for name in self.inputs)
        self.cross_names = [f"cross_{kind}_{i}" for i in range(self.n_layer) for kind in ("k", "v")]
        self.max_tokens = int(runner.get_input_details()["self_k_0"]["shape"][-1])
        self.cross_frames = int(runner.get_input_details()["cross_v_0"]["shape"][-2])
        self._fed_cross = None
        # Allocated tensors hold whatever the memory held. Masked slots get zero attention weight, but zero
        # times a NaN left there is still NaN: the caches start as zeros, and later hold only finite values.
        for name in self.inputs:
            if name.startswith(("self_", "cross_k", "cross_v")):
                self.interpreter.tensor(self.inputs[name])().fill(0)

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
        interpreter = self.interpreter
        if cross is not self._fed_cross:
            n_audio = cross[1].shape[-2]
            if "cross_len" in self.inputs:  # a shorter window fills the first n_audio frames; the rest is masked
                interpreter.set_tensor(self.inputs["cross_len"], np.array([n_audio], dtype=np.int32))
                for name, value in zip(self.cross_names, cross):
                    self._store_cross(name, value, n_audio)
            else:
                for name, value in zip(self.cross_names, cross):
                    interpreter.set_tensor(self.inputs[name], value)
            self._fed_cross = cross
        for token in tokens:
            if position >= self.max_tokens:
                raise EdgeAsrError(f"the TFLite decoder holds {self.max_tokens} tokens per window")
            interpreter.set_tensor(self.inputs["token"], np.array([[token]], dtype=np.int32))
            interpreter.set_tensor(self.inputs["position"], np.array([position], dtype=np.int32))
            interpreter.invoke()
            for i in range(self.n_layer):
                self._store(f"self_k_{i}", interpreter.get_tensor(self.outputs[f"k_{i}"])[..., 0], position)
                self._store(f"self_v_{i}", interpreter.get_tensor(self.outputs[f"v_{i}"])[..., 0, :], position)
            position += 1
        return interpreter.get_tensor(self.outputs["logits"])[0], position

    def _store_cross(self, name: str, value: np.ndarray, n_audio: int) -> None:
        # Frames past n_audio keep an earlier window's values: finite, and masked to zero weight.
        cache = self.interpreter.tensor(self.inputs[name])()
        if "_k_" in name:
            cache[..., :n_audio] = value
        else:
            cache[..., :n_audio, :] = value

    def _store(self, name: str, value: np.ndarray, slot: int) -> None:
        # A view of the input buffer, dropped before the next invoke (LiteRT refuses to run while one is held).
        cache = self.interpreter.tensor(self.inputs[name])()
        if name.startswith("self_k_"):
            cache[..., slot] = value
        else:
            cache[..., slot, :] = value


class TfliteLstmCtc:
    """features (T, n_mels) + state -> log-probabilities (T // stack, n_symbols) + the state after them,
    as `OnnxLstmCtc`: whole chunks through the "chunk" signature, the rest one step at a time."""

    backend = "tflite"

    def __init__(self, bundle: Bundle, threads: int = 2):
        interpreter = _interpreter(bundle.file("acoustic", "tflite"), threads)
        self.chunk = interpreter.get_signature_runner("chunk")
        self.step = interpreter.get_signature_runner("step")
        details = self.step.get_input_details()
        self.stack = int(bundle.manifest["frontend"]["stack"])
        self.chunk_frames = int(self.chunk.get_input_details()["features"]["shape"][0])
        n_layers = sum(name.startswith("h") for name in details)
        self.state_names = [f"{kind}{i}" for i in range(n_layers) for kind in ("h", "c")]
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
