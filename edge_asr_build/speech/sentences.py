"""Sentences we wrote for synthesized evaluation and fine-tuning audio: maintenance dictation, numbers,
commands. Generated from templates with a fixed seed, so every build hears the same set."""

from __future__ import annotations

import random

_MACHINES = [
    "press number four",
    "the north conveyor",
    "compressor two",
    "the packaging line",
    "pump seven",
    "the paint booth",
    "lathe three",
    "the cooling tower",
    "boiler one",
    "the forklift charger",
]
_PARTS = [
    "hydraulic filter",
    "drive belt",
    "main bearing",
    "pressure valve",
    "coolant hose",
    "safety sensor",
    "control board",
    "oil seal",
    "air intake",
    "spindle motor",
]
_ACTIONS = [
    "Replace the {part} on {machine}",
    "Inspect the {part} of {machine}",
    "Clean the {part} on {machine}",
    "Order a new {part} for {machine}",
    "Tighten the {part} on {machine}",
]
_WHEN = [
    "before the night shift",
    "by Friday",
    "during the next stop",
    "after lunch",
    "first thing tomorrow",
    "at the end of the week",
]
_OBSERVATIONS = [
    "{machine} is leaking oil near the {part}",
    "The {part} on {machine} makes a grinding noise",
    "Operators report that {machine} stopped twice this morning",
    "Temperature on {machine} reached {n} degrees",
    "{machine} has run {n} hours since the last service",
    "We found a crack in the {part} of {machine}",
]
_COMMANDS = [
    "Start the recording",
    "Stop the line",
    "Open the work order",
    "Close the ticket",
    "Call the supervisor",
    "Read back the last entry",
    "Mark the task as done",
    "Switch to manual mode",
]
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


# General dictation: everyday and narrative English with a wider vocabulary than the shop floor, so that
# recovery fine-tuning sees the decoder's language model at work on more than one domain.
_PEOPLE = [
    "the old captain",
    "my neighbour",
    "a young doctor",
    "the committee",
    "her brother",
    "the teacher",
    "two farmers",
    "the police officer",
    "our guide",
    "the landlord",
    "a stranger",
    "the witness",
    "the president",
    "his daughter",
    "the engineer",
    "the soldiers",
    "a tired traveller",
    "the jury",
]
_PLACES = [
    "in the harbour",
    "near the station",
    "at the edge of the forest",
    "across the river",
    "in the library",
    "behind the church",
    "on the second floor",
    "in a small village",
    "along the coast",
    "at the market",
    "inside the courthouse",
    "on the mountain road",
    "in the hospital",
    "by the old mill",
]
_VERBS_PAST = [
    "noticed",
    "carried",
    "described",
    "refused",
    "discovered",
    "remembered",
    "repaired",
    "painted",
    "questioned",
    "followed",
    "measured",
    "examined",
    "borrowed",
    "delivered",
    "ignored",
    "praised",
]
_OBJECTS = [
    "a heavy wooden box",
    "the broken window",
    "an unusual letter",
    "the silver key",
    "a loaf of bread",
    "the evening newspaper",
    "a map of the county",
    "the leather suitcase",
    "a bundle of documents",
    "the prisoner's statement",
    "a bright red umbrella",
    "the kitchen clock",
    "several photographs",
    "the weather report",
    "an envelope full of money",
    "the copper kettle",
]
_TIMES = [
    "yesterday morning",
    "late at night",
    "after the storm",
    "before the meeting",
    "in the spring of that year",
    "on a quiet Sunday",
    "during the long winter",
    "three weeks ago",
    "at half past seven",
    "last October",
]
_ADJECTIVES = [
    "remarkable",
    "difficult",
    "peaceful",
    "dangerous",
    "expensive",
    "careful",
    "curious",
    "generous",
    "anxious",
    "silent",
    "famous",
    "ordinary",
    "bitter",
    "cheerful",
]
_NOUNS = [
    "journey",
    "decision",
    "argument",
    "evidence",
    "harvest",
    "election",
    "experiment",
    "garden",
    "voyage",
    "conversation",
    "investigation",
    "building",
    "ceremony",
    "proposal",
]
_GENERAL = [
    "{person} {verb} {object} {place}",
    "{time}, {person} {verb} {object}",
    "It was a {adj} {noun}, and {person} said so {time}",
    "Nobody expected {person} to arrive {place} {time}",
    "The {noun} was more {adj} than anyone had imagined",
    "{person} {verb} {object} and then walked home",
    "When {person} returned {time}, the {noun} had already begun",
    "According to {person}, the {noun} {place} was {adj}",
    "Please tell {person} that the {noun} is postponed until {day}",
    "Is it true that {person} {verb} {object} {time}?",
    "We will meet {place} on {day} at {hour} o'clock",
    "The report says that {count} people attended the {noun}",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_COUNT_WORDS = ["two", "three", "twelve", "forty", "sixty", "a hundred", "several hundred", "nearly a thousand"]


def general_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct narrative and everyday sentences from templates."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        fill = dict(
            person=rng.choice(_PEOPLE),
            place=rng.choice(_PLACES),
            verb=rng.choice(_VERBS_PAST),
            object=rng.choice(_OBJECTS),
            time=rng.choice(_TIMES),
            adj=rng.choice(_ADJECTIVES),
            noun=rng.choice(_NOUNS),
            day=rng.choice(_DAYS),
            hour=rng.choice(_NUMBER_WORDS[1:] + ["ten", "eleven"]),
            count=rng.choice(_COUNT_WORDS),
        )
        text = _capitalize(rng.choice(_GENERAL).format(**fill))
        text = text if text.endswith("?") else text + "."
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def dictation_sentences(n: int, seed: int = 0) -> list[str]:
    """A mix for fine-tuning: half maintenance dictation, half general sentences, interleaved."""
    general = general_sentences(n - n // 2, seed)
    maintenance = maintenance_sentences(n // 2, seed)
    return [s for pair in zip(general, maintenance) for s in pair] + general[len(maintenance) :]


# Short utterances: what operators say most. Single words, digits and short numbers, commands, answers.
_SHORT_WORDS = [
    "yes",
    "no",
    "stop",
    "go",
    "start",
    "cancel",
    "next",
    "back",
    "repeat",
    "done",
    "help",
    "okay",
    "pause",
    "resume",
    "confirm",
    "delete",
    "save",
    "up",
    "down",
    "left",
    "right",
    "open",
    "close",
    "alarm",
    "reset",
    "manual",
    "automatic",
    "urgent",
    "finished",
    "checked",
    "hello",
    "thanks",
]


def short_phrases(n: int, seed: int = 0) -> list[str]:
    """`n` utterances of one to three words: digits, short numbers, single words and commands (repeats allowed:
    a digit is said many times by many voices)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.35:
            text = " ".join(rng.choice(_NUMBER_WORDS) for _ in range(rng.choice([1, 1, 1, 2, 3])))
        elif kind < 0.45:
            text = str(rng.randrange(10, 1000))
        elif kind < 0.75:
            text = rng.choice(_SHORT_WORDS + _DAYS + _ADJECTIVES + _NOUNS)
        else:
            text = rng.choice(_COMMANDS)
        out.append(_capitalize(text))
    return out
