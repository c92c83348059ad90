"""A tiny synthetic sentiment task (label = 'good' in the sentence) as CSV files, for the train tests."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ["good", "bad", "movie", "cat", "dog", "the", "a", "is", "not", "yes", "no"]


def write_task(folder: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)

    def rows(n: int) -> str:
        lines = ["sentence,label"]
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            lines.append(" ".join(words) + "," + str(int("good" in words)))
        return "\n".join(lines) + "\n"

    folder.mkdir(parents=True, exist_ok=True)
    train, dev = folder / "train.csv", folder / "dev.csv"
    train.write_text(rows(n_train))
    dev.write_text(rows(n_dev))
    return train, dev
