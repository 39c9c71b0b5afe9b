"""A seeded text-classification task whose label depends on the whole sentence.

Each sentence holds `evidence` sentiment words (an odd number) scattered uniformly among filler
words; the label is the majority sentiment. Seeing the full sentence decides the label exactly;
truncating it to fewer tokens hides part of the evidence, so accuracy falls with `max_length`.
That makes the task a fast, honest probe of sequence-length trade-offs, learnable from scratch by a
two-layer BERT in about a minute on two CPU cores.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict

from qatflash.config import SyntheticConfig

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def _sentences(cfg: SyntheticConfig, count: int, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    labels = rng.integers(0, 2, size=count)
    half = cfg.evidence // 2
    texts = []
    for label in labels:
        positives = rng.integers(half + 1, cfg.evidence + 1) if label else rng.integers(0, half + 1)
        words = [f"w{i}" for i in rng.integers(0, cfg.fillers, size=cfg.words)]
        slots = rng.choice(cfg.words, size=cfg.evidence, replace=False)
        polarity = rng.permutation([1] * positives + [0] * (cfg.evidence - positives))
        for slot, is_positive in zip(slots, polarity, strict=True):
            words[slot] = f"good{rng.integers(0, 5)}" if is_positive else f"bad{rng.integers(0, 5)}"
        texts.append(" ".join(words))
    return texts, labels.tolist()


def synthetic_splits(cfg: SyntheticConfig, seed: int) -> DatasetDict:
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
    splits = {}
    for split, size in sizes.items():
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
        texts, labels = _sentences(cfg, size, rng)
        splits[split] = Dataset.from_dict({"text": texts, "label": labels})
    return DatasetDict(splits)
