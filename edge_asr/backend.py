"""Model backends. ONNX Runtime runs Whisper's encoder and cached decoder graphs and the LSTM-CTC streaming
graph, from `.onnx` files or the same graphs in ONNX Runtime's mobile format (`.ort`); `tflite_backend`
runs the LiteRT versions. `open_model` picks one by name, or the first one installed.
"""

from __future__ import annotations

import importlib

import numpy as np

from .bundle import Bundle
from .errors import BundleError, EdgeAsrError
from .heap import return_large_blocks
from .threads import resolve_threads

BACKENDS = ("auto", "onnx", "ort", "tflite")


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def resolve_backend(bundle: Bundle, backend: str = "auto") -> str:
    """The backend `auto` means here: ONNX Runtime where it is installed, otherwise LiteRT if the bundle has
    TFLite models (armv7 has no onnxruntime wheel)."""
    if backend not in BACKENDS:
        raise EdgeAsrError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if _installed("onnxruntime"):
        for fmt in ("onnx", "ort"):
            if fmt in bundle.formats:
                return fmt
    from . import tflite_backend

    if "tflite" in bundle.formats and tflite_backend.available():
        return "tflite"
    raise EdgeAsrError(
        f"no installed backend runs this bundle ({', '.join(bundle.formats)}): install onnxruntime, "
        "or ai-edge-litert / tflite-runtime for a bundle built with --formats tflite"
    )


def open_model(bundle: Bundle, threads: int | None = None, backend: str = "auto"):
    """The acoustic model of `bundle` on the chosen backend."""
    backend = resolve_backend(bundle, backend)
    return_large_blocks()  # before the sessions allocate: their load buffers are the first large blocks freed
    lstm = bundle.family == "lstm-ctc"
    if backend == "tflite":
        from .tflite_backend import TfliteLstmCtc, whisper_model

        return (TfliteLstmCtc if lstm else whisper_model)(bundle, threads)
    return (OnnxLstmCtc if lstm else OnnxWhisper)(bundle, threads, fmt=backend)


def onnx_session(path, threads: int | None, memory_arena: bool = True):
    """A CPU session; `memory_arena=False` for a graph whose activations are large and short-lived: each
    tensor is then allocated when it is made and freed after its last use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    # A memory pattern plans one block per input shape for all of a run's activations and allocates it
    # whole; without an arena that block was the peak: 10 s windows took the default bundle from 117 MB
    # loaded to 159 MB, and to 144 MB with each tensor allocated on its own.
    options.enable_mem_pattern = memory_arena
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # On x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernel saturates sums of two products at 16
    # bits, so an int8 bundle would compute another function there than on VNNI or ARM CPUs. This makes
    # ONNX Runtime store such weights as uint8 on those CPUs only (same values, exact products).
    options.add_session_config_entry("session.x64quantprecision", "1")
    # Encoder and decoder are two sessions with a thread pool each, and numpy and the decoding loop run on
    # the Python thread between their calls. Pool threads left spinning after a run took the cores from
    # all of those: on 2 cores, a spoken digit took 100 ms instead of 48 and dev/ljspeech ran at RTF 0.039
    # instead of 0.028 (the dynamic-context bundle; the 30 s one unchanged).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({str(e).splitlines()[0][:160]})") from None


class OnnxWhisper:
    """Encoder: mel (n_mels, 3000) -> per decoder layer, cross-attention keys (transposed) and values.
    Decoder: new tokens + self-attention cache + cross keys/values -> last logits + extended cache.

    Caches are flat lists [k_0, v_0, k_1, v_1, …] in the graphs' input order."""

    def __init__(self, bundle: Bundle, threads: int | None = None, fmt: str = "onnx"):
        # No arena: it would keep each session's peak allocated for good. The encoder's activations are large
        # and short-lived (a 1500 x 1500 attention map per head); the decoder's arena held the largest beam
        # step's tensors, 3 MB of the default bundle's 151 MB peak over a 10-minute stream, for a cost of
        # about 6% on spoken digits (beams) and none measurable on sentences.
        self.backend = fmt
        self.encoder = onnx_session(bundle.file("encoder", fmt), threads, memory_arena=False)
        self.decoder = onnx_session(bundle.file("decoder", fmt), threads, memory_arena=False)
        self.max_tokens = int(bundle.manifest.model.dims["n_text_ctx"])
        names = [i.name for i in self.decoder.get_inputs()]
        self.self_names = [n for n in names if n.startswith("self_")]
        self.cross_names = [n for n in names if n.startswith("cross_")]
        # Head widths per layer come from the graph itself: a compressed model's layers may differ.
        # An empty cache has batch 1 and length 0; every other axis is fixed in the graph.
        self._empty = [
            np.zeros([d if isinstance(d, int) else 0 for d in [1, *i.shape[1:]]], dtype=np.float32)
            for i in self.decoder.get_inputs()
            if i.name.startswith("self_")
        ]

    def encode(self, mel: np.ndarray) -> list[np.ndarray]:
        return self.encoder.run(self.cross_names, {"mel": mel[None]})

    def empty_cache(self) -> list[np.ndarray]:
        return list(self._empty)

    def decode(self, tokens: list[int], cache: list[np.ndarray], cross: list[np.ndarray]):
        """Logits (n_vocab,) after the last of `tokens`, and the cache extended by them."""
        logits, cache = self.decode_batch(np.asarray([tokens]), cache, cross)
        return logits[0], cache

    def select_beams(self, cache: list[np.ndarray], sources: list[int]) -> list[np.ndarray]:
        """The caches of beams that extend beams `sources`."""
        return [c[sources] for c in cache]

    def decode_batch(self, tokens: np.ndarray, cache: list[np.ndarray], cross: list[np.ndarray]):
        """The same for a batch of sequences (beams): tokens (batch, n) and caches with that batch on their
        first axis, cross keys and values with it or with batch 1 (broadcast); logits (batch, n_vocab)."""
        feeds = {"tokens": np.asarray(tokens, dtype=np.int64)}
        feeds.update(zip(self.self_names, cache))
        feeds.update(zip(self.cross_names, cross))
        logits, *cache = self.decoder.run(None, feeds)
        return logits, cache


class OnnxLstmCtc:
    """features (T, n_mels) + state -> log-probabilities (T // stack, n_symbols) + the state after them.

    The state is the graph's own list of (h, c) per layer, in its input order; zeros start an utterance."""

    def __init__(self, bundle: Bundle, threads: int | None = None, fmt: str = "onnx"):
        self.backend = fmt
        self.session = onnx_session(bundle.file("acoustic", fmt), threads)
        inputs = self.session.get_inputs()
        self.state_names = [i.name for i in inputs[1:]]
        self.output_names = ["log_probs"] + [f"{n}_out" for n in self.state_names]
        self._initial = [np.zeros(i.shape, dtype=np.float32) for i in inputs[1:]]
        self.stack = bundle.manifest.frontend.stack

    def initial_state(self) -> list[np.ndarray]:
        return list(self._initial)

    def run(self, features: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"features": features}
        feeds.update(zip(self.state_names, state))
        log_probs, *state = self.session.run(self.output_names, feeds)
        return log_probs, state
