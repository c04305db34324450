"""A bundle described in words (`edge-asr info`): model, source, formats, context policy, guards, adaptation,
files and the evaluations its manifest records."""

from __future__ import annotations

from .bundle import Bundle
from .context import ContextPolicy
from .guards import Guards


def describe(bundle: Bundle) -> list[str]:
    """Lines that say what `bundle` holds."""
    m, raw = bundle.manifest, bundle.manifest.raw
    out = [f"{m.name}  ({bundle.path})"]
    if bundle.family == "lstm-ctc":
        c = raw["model"]["config"]
        layers = ", ".join(f"{h}" + (f"/p{p}" if p else "") for h, p in zip(c["hidden"], c["proj"]))
        kind = "Whisper encoder converted to LSTM blocks" if raw["model"].get("architecture") == "cald" else "layers"
        out.append(
            f"  model      lstm-ctc {m.model.precision}, {m.model.parameters / 1e6:.2f} M params, "
            f"{kind} {layers}, {len(m.tokenizer.alphabet) - 1} characters"
        )
    else:
        out.append(
            f"  model      whisper {m.model.precision}, {m.model.parameters / 1e6:.2f} M params, "
            f"{'multilingual' if raw['model'].get('multilingual') else 'English-only'}"
        )
    source = raw.get("source", {})
    out.append(f"  source     {source.get('format')} {source.get('path')} (sha256 {source.get('sha256', '?')[:16]}…)")
    out.append(f"  formats    {', '.join(bundle.formats)}")
    if bundle.family == "whisper":
        out.append(f"  context    {ContextPolicy.from_manifest(m).describe()}")
        g = Guards.from_manifest(m)
        out.append(
            f"  guards     no speech above {g.no_speech_threshold} with mean log-probability below "
            f"{g.logprob_threshold} (alone above {g.certain_no_speech_threshold}); loops and compression "
            f"ratio above {g.compression_ratio_threshold} fall back to temperatures {list(g.temperatures)[1:]}"
        )
        if raw.get("adaptation"):
            a = raw["adaptation"]
            what = ", ".join(
                filter(None, [a.get("kind"), a.get("rank") and f"LoRA rank {a['rank']}", f"sha256 {a['sha256'][:16]}…"])
            )
            out.append(
                f"  adapted    {a['delta']} ({what}), held-out loss "
                f"{a['held_out_loss']['before']} -> {a['held_out_loss']['after']}"
            )
            if a.get("pruned"):
                out.append(
                    f"  pruned     decoder blocks kept {a['pruned']['decoder']}, "
                    f"encoder blocks kept {a['pruned']['encoder']}"
                )
    for name, f in m.files.items():
        out.append(f"  file       {name:22s} {f.bytes / 1e6:8.2f} MB  sha256 {f.sha256[:16]}…")
    for name, ev in m.evaluation.items():
        out.append(
            f"  evaluation {name}: WER {ev['wer']:.2f}% on {ev['words']} words ({ev.get('description', ev['set'])})"
        )
    return out
