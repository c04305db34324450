"""What every recipe run is given and what it leaves: the run description (`RecipeRun`) that adapt, recover,
prune and the LSTM conversion share, the reference sets of a loaded model, the checkpoint in the work
folder, and the delta file with the metadata every delta carries."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from edge_asr_build.matching.data import clips_dir, reference_sets
from edge_asr_build.matching.engine import MatchConfig, MatchResult
from edge_asr_build.matching.lora import save_delta
from edge_asr_build.sources import LoadedWhisper
from edge_asr_build.speech.training_audio import AudioMix, HeldOutMix, describe_corpus
from edge_asr_build.whisper.vocabulary import decoding_rules


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True)
class RecipeRun:
    """A recipe's run: the model `source`, the file `out` it writes, recorded corpora and the user's own
    audio, the work folder (None: in $EDGE_ASR_HOME, named by what the work depends on), whether a stopped
    run resumes, the training steps (None: the recipe's own), and where progress and log lines go."""

    source: str
    out: Path
    corpora: tuple[Path, ...] = ()
    user_audio: tuple[Path, ...] = ()
    work: Path | None = None
    resume: bool = False
    steps: int | None = None
    step: Callable[[str], None] = _quiet
    log: Callable[[str], None] = print

    def match(self, config: MatchConfig) -> MatchConfig:
        """`config` with this run's steps, where it names them."""
        return config if self.steps is None else replace(config, steps=self.steps)

    def checkpoint(self, path: Path) -> Path:
        """The checkpoint at `path`, kept only for a run that resumes."""
        if not self.resume:
            path.unlink(missing_ok=True)
        return path

    def reference_sets(
        self,
        loaded: LoadedWhisper,
        mix: AudioMix,
        held_out: HeldOutMix,
        seed: int,
        train_limit: int | None = None,
    ) -> tuple[Path, list, list]:
        """(work folder, training items, held-out items) of `loaded` as the reference: shared by every recipe
        with the same mixes and audio (see `matching.data.reference_sets`)."""
        return reference_sets(
            loaded,
            decoding_rules(loaded),
            mix,
            held_out,
            seed,
            list(self.corpora),
            list(self.user_audio),
            self.work,
            "context",
            self.step,
            train_limit=train_limit,
        )

    def clips(self, mix: AudioMix, held_out: HeldOutMix, seed: int) -> Path:
        """The folder of the mixes' clip mels that `reference_sets` made (`matching.data.clips_dir`)."""
        return clips_dir(mix, held_out, seed, list(self.corpora), list(self.user_audio))

    def audio(self) -> dict:
        """The run's audio as a delta's metadata records it."""
        return {"corpora": [describe_corpus(p) for p in self.corpora], "user_audio": [str(p) for p in self.user_audio]}


def recipe_metadata(
    kind: str,
    loaded: LoadedWhisper,
    match: MatchConfig,
    recipe: dict,
    run: RecipeRun,
    clips: dict,
    result: MatchResult,
    prepared: float,
    **details,
) -> dict:
    """The metadata every matched delta carries (what it is, of which model, by which recipe, on what audio,
    with which result), and the recipe's own `details`."""
    return {
        "kind": kind,
        "source": loaded.source,
        "rank": match.lora_rank,
        "alpha": match.lora_alpha,
        "parts": list(match.parts),
        "recipe": recipe,
        **details,
        **run.audio(),
        "clips": clips,
        "result": result.to_dict(),
        "seconds": {"prepare": round(prepared, 1), "train": result.seconds},
    }


def write_delta(student, out: Path, metadata: dict, readable: dict | None = None, whole: list[str] = ()) -> None:
    """The student's adapters (and `whole` parameters) as the delta `out`, its metadata in the header and, as
    `readable` (default: the metadata itself), in a JSON file beside it."""
    save_delta(student, Path(out), metadata, whole=list(whole))
    Path(out).with_suffix(".json").write_text(json.dumps(readable or metadata, indent=2) + "\n", encoding="utf-8")
