"""How much audio context the encoder sees: the window's own length, or Whisper's fixed 30 s.

Whisper was trained on 30 s windows, so a short clip normally pays for 30 s of encoder work. A bundle
whose model was adapted to shorter input (the build step's `--context auto`) records a policy in its
manifest: each window is padded to its audio plus a margin, at least a floor, rounded up to one of a few
bucket lengths. Buckets keep the number of distinct shapes small, which is what LiteRT's static graphs
need (one signature per bucket); ONNX Runtime takes any length but uses the same buckets, so both backends
see exactly the input the model was adapted on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frontend import SAMPLE_RATE
from .manifest import Manifest

FRAMES_PER_SECOND = 100  # mel frames (10 ms hop); the encoder halves them
FULL_SECONDS = 30


@dataclass(frozen=True)
class ContextPolicy:
    mode: str = "full"  # "full" (30 s), "auto" (audio + margin, bucketed), "fixed"
    margin_s: float = 0.0
    floor_s: float = FULL_SECONDS
    buckets_s: tuple[float, ...] = (FULL_SECONDS,)

    @classmethod
    def full(cls) -> "ContextPolicy":
        return cls()

    @classmethod
    def auto(
        cls, margin_s: float = 0.5, floor_s: float = 3.0, buckets_s: tuple[float, ...] = (1, 2, 3, 5, 8, 12, 20, 30)
    ) -> "ContextPolicy":
        return cls("auto", margin_s, floor_s, tuple(float(b) for b in buckets_s))

    @classmethod
    def fixed(cls, seconds: float) -> "ContextPolicy":
        """Every window padded to `seconds` (whisper.cpp's audio_ctx); longer audio is cut into such windows."""
        if not 1 <= seconds <= FULL_SECONDS:
            raise ValueError(f"a fixed context must be between 1 and {FULL_SECONDS} seconds")
        return cls("fixed", 0.0, float(seconds), (float(seconds),))

    @classmethod
    def parse(cls, text: str) -> "ContextPolicy":
        """`auto`, `full` or a number of seconds, as `edge-asr build --context` takes it."""
        if text in ("auto", "full"):
            return getattr(cls, text)()
        try:
            return cls.fixed(float(text))
        except ValueError as e:
            raise ValueError(f"--context takes auto, full or seconds (1-30), not {text!r}: {e}") from None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ContextPolicy":
        """The bundle's policy; bundles from before policies existed are 30 s models."""
        return cls.from_dict(manifest.frontend.context)

    @classmethod
    def from_dict(cls, section: dict | None) -> "ContextPolicy":
        """The policy a manifest's `frontend.context` records (None: the 30 s model)."""
        if not section:
            return cls.full()
        return cls(
            section["mode"],
            float(section["margin_s"]),
            float(section["floor_s"]),
            tuple(float(b) for b in section["buckets_s"]),
        )

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "margin_s": self.margin_s,
            "floor_s": self.floor_s,
            "buckets_s": list(self.buckets_s),
        }

    @property
    def max_seconds(self) -> float:
        """The longest window: longer audio is cut into windows of at most this length."""
        return self.buckets_s[-1]

    @property
    def bucket_frames(self) -> list[int]:
        return [round(b * FRAMES_PER_SECOND) for b in self.buckets_s]

    def seconds(self, n_samples: int) -> float:
        """The encoder's input length, in seconds, for a window of `n_samples` samples."""
        wanted = max(n_samples / SAMPLE_RATE + self.margin_s, self.floor_s)
        return next((b for b in self.buckets_s if b >= wanted - 1e-9), self.buckets_s[-1])

    def frames(self, n_samples: int) -> int:
        return round(self.seconds(n_samples) * FRAMES_PER_SECOND)

    def describe(self) -> str:
        if self.mode == "full":
            return "full: every window padded to 30 s"
        if self.mode == "fixed":
            return f"fixed: every window padded to {self.floor_s:g} s"
        buckets = ", ".join(f"{b:g}" for b in self.buckets_s)
        return f"auto: audio + {self.margin_s:g} s, at least {self.floor_s:g} s, rounded up to a bucket ({buckets} s)"
