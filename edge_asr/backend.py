"""ONNX Runtime backend: runs the bundle's encoder and cached decoder graphs."""
from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .errors import BundleError


def _session(path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({str(e).splitlines()[0][:160]})") from None


class OnnxWhisper:
    """Encoder: mel (1, n_mels, 3000) -> cross-attention keys/values of every decoder layer.
    Decoder: new tokens + self-attention cache + cross keys/values -> last logits + extended cache."""

    def __init__(self, bundle: Bundle, threads: int = 2):
        self.encoder = _session(bundle.file("encoder"), threads)
        self.decoder = _session(bundle.file("decoder"), threads)
        dims = bundle.manifest["model"]["dims"]
        self.n_layer, self.n_state = dims["n_text_layer"], dims["n_text_state"]

    def encode(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cross_k, cross_v = self.encoder.run(None, {"mel": mel[None]})
        return cross_k, cross_v

    def empty_cache(self) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros((self.n_layer, 1, 0, self.n_state), dtype=np.float32)
        return empty, empty

    def decode(self, tokens: list[int], self_k, self_v, cross_k, cross_v):
        logits, self_k, self_v = self.decoder.run(
            None,
            {
                "tokens": np.asarray([tokens], dtype=np.int64),
                "self_k": self_k,
                "self_v": self_v,
                "cross_k": cross_k,
                "cross_v": cross_v,
            },
        )
        return logits[0], self_k, self_v
