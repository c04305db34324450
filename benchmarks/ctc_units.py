#!/usr/bin/env python3
"""Characters or a small BPE for a converted model's CTC head: the same frozen encoder, one linear head per
unit set, trained alike on the teacher's transcripts of the conversion's clips; held-out WER against the
teacher's transcripts (synthesized sentences, short utterances, recorded speakers).

  python benchmarks/ctc_units.py ~/models/tiny-cald.json --corpus speechocean762 --corpus wake-word-benchmark/audio
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path


def bpe(texts: list[str], size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=["<blank>"]))
    return tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--corpus", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--bpe", default="128,512", help="BPE vocabulary sizes (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from edge_asr.ctc import ALPHABET, greedy_symbols
    from edge_asr.metrics import word_error_rate
    from edge_asr_build.lstm.cald import load_cald
    from edge_asr_build.lstm.cald_data import conversion_sets
    from edge_asr_build.lstm.cald_train import encoder_outputs
    from edge_asr_build.recipes.run import RecipeRun

    torch.set_num_threads(args.threads)
    model, _ = load_cald(args.checkpoint)
    _, train, held_out, _ = conversion_sets(RecipeRun("tiny.en", Path(), tuple(Path(c) for c in args.corpus)))
    features, held_features = encoder_outputs(model, train, 3000), encoder_outputs(model, held_out, 3000)
    subsets = {"sentences": slice(0, 30), "short": slice(30, 60), "recorded": slice(60, None), "all": slice(None)}
    units = [("characters", None)] + [(f"BPE {n}", bpe([c.text for c in train], int(n))) for n in args.bpe.split(",")]
    print(
        f"{len(train)} training clips, {len(held_out)} held out, {args.steps} steps of a linear head each",
        file=sys.stderr,
    )
    print("| units | symbols | " + " | ".join(f"{k} WER %" for k in subsets) + " | train s |")
    print("|---|---|" + "---|" * (len(subsets) + 1))
    for name, tokenizer in units:
        if tokenizer is None:
            n_symbols = len(ALPHABET)
            labels = [c.labels for c in train]
            decode = lambda ids: "".join(ALPHABET[i] for i in ids)  # noqa: E731
        else:
            n_symbols = tokenizer.get_vocab_size()
            labels = [torch.tensor(tokenizer.encode(c.text).ids or [1]) for c in train]
            decode = tokenizer.decode
        head = torch.nn.Linear(features[0].shape[-1], n_symbols)
        optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
        rng, started = random.Random(0), time.time()
        for _ in range(args.steps):
            chosen = rng.sample(range(len(train)), 32)
            x = torch.nn.utils.rnn.pad_sequence([features[i].float() for i in chosen], batch_first=True)
            log_probs = head(x).log_softmax(-1).transpose(0, 1)
            loss = torch.nn.functional.ctc_loss(
                log_probs,
                torch.cat([labels[i] for i in chosen]),
                torch.tensor([len(features[i]) for i in chosen]),
                torch.tensor([len(labels[i]) for i in chosen]),
                zero_infinity=True,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            hyps = [
                " ".join(decode(greedy_symbols(head(f.float()).log_softmax(-1).numpy())[0]).split())
                for f in held_features
            ]
        refs = [c.text for c in held_out]
        wers = [word_error_rate(refs[s], hyps[s], normalized=False) for s in subsets.values()]
        print(f"| {name} | {n_symbols} | " + " | ".join(f"{w:.1f}" for w in wers) + f" | {time.time() - started:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
