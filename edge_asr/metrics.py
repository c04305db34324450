"""Word error rate as the project reports it: Whisper's English normalizer on both sides, then jiwer."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _normalizer()(text)


def word_error_rate(references: list[str], hypotheses: list[str], normalized: bool = True) -> float:
    """Pooled WER in percent over all utterances (errors summed, divided by all reference words).

    `normalized`: Whisper's English normalizer on both sides first (how the project reports WER); off for
    texts already in one plain form, such as a CTC model's alphabet."""
    import jiwer

    refs = [normalize(r) for r in references] if normalized else list(references)
    hyps = [normalize(h) for h in hypotheses] if normalized else list(hypotheses)
    kept = [(r, h) for r, h in zip(refs, hyps) if r.strip()]  # jiwer refuses empty references
    if not kept:
        return 0.0
    return 100.0 * jiwer.wer([r for r, _ in kept], [h for _, h in kept])
