"""Synthetic tasks for the bundled demo model, with answers a test can check.

Every example is a prompt with blanks plus its answers. Word lists are drawn at random, so a
held-out seed gives prompts the model never saw; the answers are always recoverable from the prompt
itself (copying, continuing a known cycle), which a small model learns in minutes.

- recall  "list : cat owl sun . again : cat [MASK] sun ."          -> owl
- cycle   "days : monday tuesday [MASK] thursday"                   -> wednesday
- repeat  "list : cat owl sun . again : [gMASK]"                    -> cat owl sun .
- two     "list : cat owl sun fox . again : [MASK] owl sun [MASK] ." -> cat, fox

(A table look-up task, "table : red 4 , blue 7 . blue [MASK]", was tried and dropped: this 1.5 M
parameter model stayed at chance on it after 15 minutes of training; copying by position it learns.)
"""
from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = ("cat dog owl fox bee cow pig hen ant elk yak emu bat rat eel ram "
         "sun moon star rain snow wind fire rock tree leaf seed root lake hill sand salt "
         "red blue gold pink gray green black white "
         "cup pan box bag key pen map hat "
         "ship boat cart sled kite drum horn bell").split()
DIGITS = [str(d) for d in range(10)]
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()


@dataclass
class Example:
    kind: str
    prompt: str          # with [MASK] / [gMASK] markers
    answers: list[str]   # one per blank, left to right


def recall(rng: random.Random) -> Example:
    items = rng.sample(WORDS, rng.randint(3, 6))
    hole = rng.randrange(len(items))
    shown = [w if i != hole else "[MASK]" for i, w in enumerate(items)]
    return Example("recall", f"list : {' '.join(items)} . again : {' '.join(shown)} .", [items[hole]])


def cycle(rng: random.Random) -> Example:
    name, seq = rng.choice((("days", DAYS), ("months", MONTHS)))
    start, length = rng.randrange(len(seq)), rng.randint(4, 6)
    window = [seq[(start + i) % len(seq)] for i in range(length)]
    hole = rng.randrange(1, length)
    shown = [w if i != hole else "[MASK]" for i, w in enumerate(window)]
    return Example("cycle", f"{name} : {' '.join(shown)}", [window[hole]])


def repeat(rng: random.Random) -> Example:
    items = rng.sample(WORDS, rng.randint(3, 5))
    return Example("repeat", f"list : {' '.join(items)} . again : [gMASK]", [f"{' '.join(items)} ."])


def two_recalls(rng: random.Random) -> Example:
    items = rng.sample(WORDS, rng.randint(4, 6))
    holes = sorted(rng.sample(range(len(items)), 2))
    shown = [w if i not in holes else "[MASK]" for i, w in enumerate(items)]
    return Example("two", f"list : {' '.join(items)} . again : {' '.join(shown)} .", [items[h] for h in holes])


TASKS = {"recall": recall, "cycle": cycle, "repeat": repeat, "two": two_recalls}
TRAIN_SEED, HELD_OUT_SEED = 1, 987654


def examples(kind: str, count: int, seed: int) -> list[Example]:
    rng = random.Random(f"{kind}-{seed}")
    return [TASKS[kind](rng) for _ in range(count)]


def held_out(kind: str, count: int = 60) -> list[Example]:
    """Prompts drawn with a seed training never uses."""
    return examples(kind, count, HELD_OUT_SEED)


def tokenizer_corpus() -> list[str]:
    """Text for training the demo tokenizer: every word and symbol the tasks use."""
    rng = random.Random(0)
    lines = [f"{e.prompt} {' '.join(e.answers)}" for kind in TASKS for e in examples(kind, 200, 0)]
    lines += [" ".join(WORDS), " ".join(DAYS), " ".join(MONTHS), " ".join(DIGITS)]
    rng.shuffle(lines)
    return [line.replace("[MASK]", "").replace("[gMASK]", "") for line in lines]
