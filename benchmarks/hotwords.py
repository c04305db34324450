"""Hotwords on synthesized dictation with 20 rare domain words (brand-like names and part codes).

Four sets, written here and synthesized once into --work:
- tune:    20 sentences, one hotword each, spoken by piper's default voice (joe). The bonus and the
           use of the prompt are chosen on the two tune sets only.
- tune-none: 20 sentences without hotwords, by the same voice.
- report:  40 other sentences, each hotword twice, spoken by espeak-ng (a voice never used for tuning).
- none:    40 sentences without any hotword, by the report voice: how many hotwords get inserted.
- report2, none2: the same again with new sentences and another espeak-ng voice (see REPORT2).

A hotword counts as recognized when its letters and digits appear in the normalized hypothesis with
spaces and hyphens removed ("KX40" and "KX 40" both count for "KX-40"). Other words' WER is computed with
the hotwords removed from the references and their recognized forms from the hypotheses.

    python benchmarks/hotwords.py [--bundle DIR] [--work DIR] [--bonus 0,1,2,3,4] [--sets tune,report,none]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

WORDS = [
    "Kestrolix",
    "Vantorq",
    "Brennholt",
    "Zyphera",
    "Quorvane",
    "Maltrexa",
    "Dravenko",
    "Pelgrano",
    "Tuvorin",
    "Ferrolux",
    "Nexilor",
    "Oskarbeck",
    "Corvantis",
    "Yaldring",
    "KX-40",
    "TR-9",
    "VX-220",
    "MB-7",
    "ZR-15",
    "HL-300",
]

TUNE = [
    "Fit a new seal on the {} pump before lunch.",
    "The gearbox from {} is leaking oil again.",
    "Call {} about the delayed order.",
    "Check the torque on the {} coupling.",
    "We replaced the {} sensor on line two.",
    "The {} controller shows a fault code.",
    "Order four filters from {} today.",
    "The night crew reported noise from the {} drive.",
    "Clean the nozzle of the {} sprayer.",
    "Log a warranty claim with {} for the motor.",
    "The {} valve sticks when it is cold.",
    "Ask the supplier {} for a quote.",
    "Inspect the {} belt for cracks.",
    "Swap the fuse in the {} panel.",
    "The {} compressor needs a new gasket.",
    "Send the broken part back to {}.",
    "The {} bearing is running hot.",
    "Book a service visit from {} next week.",
    "Tighten the bolts on the {} bracket.",
    "The {} pressure switch failed twice.",
]
REPORT = [
    "Please check the {} unit on press three.",
    "The new {} hose arrived this morning.",
    "Return the damaged {} module to the store.",
    "Our contact at {} will call back.",
    "The {} spindle vibrates at full speed.",
    "Lubricate the {} chain every shift.",
    "We are out of {} cartridges.",
    "The {} display is blank after the restart.",
    "Mark the {} pump as out of service.",
    "The invoice from {} is still open.",
    "Measure the play in the {} shaft.",
    "The {} relay clicks but does not close.",
    "Replace the worn {} rollers on conveyor five.",
    "Ask {} for the wiring diagram.",
    "The {} heater takes too long to warm up.",
    "Tell the foreman the {} drive tripped.",
    "The {} clamp slipped during the test.",
    "Reorder the {} filters before Friday.",
    "The oil level in the {} tank is low.",
    "Calibrate the {} scale after cleaning.",
    "The {} fan makes a rattling sound.",
    "Store the spare {} parts on shelf nine.",
    "Update the firmware of the {} robot.",
    "The {} coupling was replaced yesterday.",
    "Check the {} cable for damage.",
    "The {} brake wears faster than expected.",
    "Record the hours on the {} meter.",
    "The technician from {} fixed the leak.",
    "Test the {} alarm every Monday.",
    "The {} gauge reads too high.",
    "Grease the {} hinges on both doors.",
    "The {} motor hums but will not start.",
    "Keep the {} manual next to the machine.",
    "The shipment from {} was short by two boxes.",
    "Adjust the {} sensor by two millimetres.",
    "The {} seal leaked after one week.",
    "Move the {} cart to bay four.",
    "The quote from {} expires on Monday.",
    "Reset the {} counter at the end of the shift.",
    "The {} pump lost pressure overnight.",
]
TUNE_NONE = [
    "Drain the water from the air tank.",
    "The left door of the oven does not seal.",
    "Bring two spare fuses to line one.",
    "The temperature alarm went off at noon.",
    "Clean the chips out of the milling machine.",
    "The hose reel in bay six is jammed.",
    "Write down the serial number of the new motor.",
    "The paint on the guard rail is peeling.",
    "Turn off the compressor before you leave.",
    "The label printer is out of ink.",
    "The pallet jack leaks hydraulic fluid.",
    "Check the level of the coolant every morning.",
    "The pressure gauge on tank two is cracked.",
    "Put a new blade in the band saw.",
    "The exhaust fan above the welder is noisy.",
    "Return the torque wrench to the tool crib.",
    "The night shift found a loose wire in the panel.",
    "Replace the worn brushes on the sander.",
    "The shipping scale needs a new battery.",
    "Wipe down the touch screen after each shift.",
]
NONE = [
    "Sweep the floor around the lathe.",
    "The forklift battery needs charging.",
    "Close the loading dock door at six.",
    "Two pallets of screws arrived late.",
    "The air line in bay two is leaking.",
    "Wear gloves when handling the coolant.",
    "The emergency stop was tested today.",
    "Refill the hand soap in the washroom.",
    "The crane inspection is due next month.",
    "Lock the tool cabinet after use.",
    "The water cooler is out of cups.",
    "Replace the light over the saw.",
    "Check the fire extinguisher tags.",
    "The welding curtain is torn.",
    "Empty the scrap bin before the weekend.",
    "The conveyor belt squeaks on the left side.",
    "Put the ladder back in the store room.",
    "The heating in the office is off.",
    "Order more safety glasses in size large.",
    "The drill press chuck is loose.",
    "Clean the windows of the control room.",
    "The parking lot lights are out.",
    "Wipe the oil off the stairs.",
    "The paint booth filter is clogged.",
    "Label the new shelves in the warehouse.",
    "The first aid kit needs bandages.",
    "The radio in the break room is broken.",
    "Sign the visitor log at the gate.",
    "The coffee machine leaks water.",
    "Stack the empty crates by the wall.",
    "The grinder guard is missing a screw.",
    "Test the smoke alarm in the kitchen.",
    "The floor drain is blocked again.",
    "Move the trolley out of the walkway.",
    "The hydraulic press is back in service.",
    "Count the spare gloves on Friday.",
    "The main gate sticks when it rains.",
    "Check the tire pressure on the van.",
    "The lunch break starts at noon today.",
    "The roof gutter is full of leaves.",
]
# A second report, written after the first was measured and after the "keep the prompted window only if it
# says a hotword" rule was added: new sentences and another voice, so the final numbers come from audio no
# decision was made on.
REPORT2 = [
    "The {} hydraulic unit is making a whining noise.",
    "Please find the {} drawings for the new line.",
    "The operator says the {} feeder jams twice an hour.",
    "Send a photo of the {} nameplate to purchasing.",
    "The {} drive belt was changed on Tuesday.",
    "We need a second {} bracket for the guard.",
    "The {} thermostat is set too low.",
    "Write the {} batch number on the form.",
    "The engineer from {} arrives at nine.",
    "The {} oil filter is overdue.",
    "Put the {} module on the test bench.",
    "The {} contactor smells burnt.",
    "Order a spare {} nozzle for the glue station.",
    "The {} clutch slips under load.",
    "The {} ballast in bay one is buzzing.",
    "Keep the old {} board for spare parts.",
    "The {} limit switch needs adjusting.",
    "Ask {} whether the part is in stock.",
    "The {} pump was rebuilt last spring.",
    "Check the {} valve for scale.",
    "The {} sensor reads zero after the power cut.",
    "Bring the {} service kit to line four.",
    "The label on the {} box is wrong.",
    "The {} actuator moves too slowly.",
    "Note the {} error on the shift report.",
    "The {} encoder cable is frayed.",
    "We got a credit note from {} today.",
    "Clean the {} strainer once a week.",
    "The {} transformer runs warm.",
    "Fit the new {} plate before the audit.",
    "The {} timer resets by itself.",
    "Return the {} gauge for calibration.",
    "The {} blower is louder than usual.",
    "The delivery from {} came without papers.",
    "Mount the {} camera above the press.",
    "The {} shaft seal weeps oil.",
    "Replace the {} lamp in the cabinet.",
    "The {} hoist failed its inspection.",
    "Ask the {} helpdesk for a new licence.",
    "The {} bushing is worn on one side.",
]
NONE2_SEED = 2026
REPORT_VOICE = ("en-us", 150, 50)  # espeak-ng voice, words per minute, pitch
REPORT2_VOICE = ("en-us+m2", 145, 45)


def sets() -> dict[str, list[tuple[str, list[str]]]]:
    tune = [(t.format(w), [w]) for t, w in zip(TUNE, WORDS)]
    report = [(t.format(WORDS[i % 20]), [WORDS[i % 20]]) for i, t in enumerate(REPORT)]
    from edge_asr_build.speech.sentences import dictation_sentences

    report2 = [(t.format(WORDS[(i + 7) % 20]), [WORDS[(i + 7) % 20]]) for i, t in enumerate(REPORT2)]
    return {
        "tune": tune,
        "tune-none": [(t, []) for t in TUNE_NONE],
        "report": report,
        "none": [(t, []) for t in NONE],
        "report2": report2,
        "none2": [(t, []) for t in dictation_sentences(40, seed=NONE2_SEED)],
    }


def synthesize_sets(work: Path) -> None:
    from edge_asr_build.speech.synth import espeak, synthesize, write_wav

    for name, items in sets().items():
        folder = work / name
        if (folder / "refs.tsv").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i, (text, _) in enumerate(items):
            voice, rate, pitch = REPORT2_VOICE if name.endswith("2") else REPORT_VOICE
            audio = synthesize(text) if name.startswith("tune") else espeak(text, voice, rate=rate, pitch=pitch)
            write_wav(folder / f"{name}{i:03d}.wav", audio)
        (folder / "refs.tsv").write_text("".join(f"{name}{i:03d}\t{t}\n" for i, (t, _) in enumerate(items)))


def score(items, hypotheses: list[str]) -> dict:
    """Hotword misses, insertions, and the WER of the other words."""
    from edge_asr.hotwords import letters_and_digits as compact
    from edge_asr.metrics import normalize, word_error_rate

    misses = total = inserted = 0
    refs, hyps = [], []
    for (text, words), hyp in zip(items, hypotheses):
        flat = compact(normalize(hyp))
        for w in words:
            total += 1
            misses += compact(w) not in flat
        inserted += sum(compact(w) in flat for w in WORDS if w not in words)
        ref, out = normalize(text), normalize(hyp)
        for w in words:  # drop the hotword from both sides, in the forms it may take
            form = normalize(w)
            ref = ref.replace(form, " ")
            out = re.sub(r"\s*".join(re.escape(c) for c in compact(form)), " ", out)
        refs.append(ref)
        hyps.append(out)
    return {
        "hotwords": total,
        "missed": misses,
        "miss_rate": round(100 * misses / total, 1) if total else None,
        "inserted": inserted,
        "other_wer": round(word_error_rate(refs, hyps), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--work", default="/tmp/edge-asr-hotwords")
    parser.add_argument("--bonus", default="0,1,2,3,4", help="hotword bonuses to try (0: no hotwords)")
    parser.add_argument("--prompt", default="off,on", help="also name the hotwords in the prompt: off, on or both")
    parser.add_argument("--sets", default="tune,tune-none")
    parser.add_argument("--beam", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import edge_asr
    from edge_asr.bench import load_speech_set
    from edge_asr.paths import bundle_dir
    from edge_asr.settings import DecodingSettings

    work = Path(args.work)
    synthesize_sets(work)
    bundle = args.bundle or str(bundle_dir())
    all_sets = sets()
    rows = []
    for prompt in args.prompt.split(","):
        for bonus in [float(b) for b in args.bonus.split(",")]:
            if bonus == 0 and prompt == "off" and rows:  # no hotwords at all: measured once
                continue
            named = prompt == "on"
            settings = DecodingSettings(
                beam=args.beam, hotwords=WORDS if bonus or named else [], hotword_bonus=bonus, hotword_prompt=named
            )
            transcriber = edge_asr.load(bundle, 2, settings)
            for name in args.sets.split(","):
                audio = load_speech_set(work / name)
                hyps = [transcriber.transcribe(u.audio).text for u in audio]
                row = {"set": name, "bonus": bonus, "prompt": prompt} | score(all_sets[name], hyps)
                rows.append(row)
                print(
                    f"{name:7s} bonus {bonus:4.1f} prompt {prompt:3s}  missed {row['missed']:3d}/{row['hotwords']:3d} "
                    f"({row['miss_rate']}%)  inserted {row['inserted']:2d}  other WER {row['other_wer']:6.2f}",
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
