"""Sentences we wrote for synthesized evaluation and fine-tuning audio: maintenance dictation, numbers,
commands. Generated from templates with a fixed seed, so every build hears the same set."""
from __future__ import annotations

import random

_MACHINES = ["press number four", "the north conveyor", "compressor two", "the packaging line", "pump seven",
             "the paint booth", "lathe three", "the cooling tower", "boiler one", "the forklift charger"]
_PARTS = ["hydraulic filter", "drive belt", "main bearing", "pressure valve", "coolant hose", "safety sensor",
          "control board", "oil seal", "air intake", "spindle motor"]
_ACTIONS = ["Replace the {part} on {machine}", "Inspect the {part} of {machine}", "Clean the {part} on {machine}",
            "Order a new {part} for {machine}", "Tighten the {part} on {machine}"]
_WHEN = ["before the night shift", "by Friday", "during the next stop", "after lunch", "first thing tomorrow",
         "at the end of the week"]
_OBSERVATIONS = [
    "{machine} is leaking oil near the {part}",
    "The {part} on {machine} makes a grinding noise",
    "Operators report that {machine} stopped twice this morning",
    "Temperature on {machine} reached {n} degrees",
    "{machine} has run {n} hours since the last service",
    "We found a crack in the {part} of {machine}",
]
_COMMANDS = ["Start the recording", "Stop the line", "Open the work order", "Close the ticket", "Call the supervisor",
             "Read back the last entry", "Mark the task as done", "Switch to manual mode"]
_NUMBER_WORDS = "zero one two three four five six seven eight nine".split()


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def maintenance_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences mixing dictation, measurements, spelled digits and commands."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        kind = rng.random()
        fill = dict(machine=rng.choice(_MACHINES), part=rng.choice(_PARTS), n=rng.randrange(20, 400))
        if kind < 0.4:
            text = f"{rng.choice(_ACTIONS).format(**fill)} {rng.choice(_WHEN)}."
        elif kind < 0.75:
            text = _capitalize(rng.choice(_OBSERVATIONS).format(**fill)) + "."
        elif kind < 0.9:
            digits = " ".join(rng.choice(_NUMBER_WORDS) for _ in range(rng.randrange(3, 7)))
            text = f"The serial number is {digits}."
        else:
            text = rng.choice(_COMMANDS) + "."
        if text not in seen:
            seen.add(text)
            out.append(_capitalize(text))
    return out
