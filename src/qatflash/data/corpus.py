"""Raw text for language modelling: local .txt/.jsonl/.parquet files or a hub dataset, one `text` column.

Rows keep their order (running text must not be shuffled). A .txt file is read line by line with
its line breaks kept, so the text the model sees is the file itself; a split the files lack can be
carved from the end of the training text (`data.holdout`), which is how WikiText-2's shared copy,
which has no training split, gets a validation split.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from datasets import DatasetDict

from qatflash.config import SPLITS, DataConfig
from qatflash.data.sources import hub_splits, load_files, split_files
from qatflash.errors import ConfigError

# File suffix -> (datasets builder, extra builder arguments).
TEXT_FORMATS = {
    ".txt": ("text", {"keep_linebreaks": True}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


def load_corpus(cfg: DataConfig) -> DatasetDict:
    """train/validation/test, each a `text` column in the order of the source."""
    if cfg.path is not None:
        raw = _local_corpus(cfg)
    elif cfg.hub_id is not None:
        raw = hub_splits(cfg)
    else:
        raise ConfigError("data.kind=causal_lm reads text: set data.path (local files) or data.hub_id")
    for split, ds in raw.items():
        if cfg.text_column not in ds.column_names:
            raise ConfigError(
                f"data.text_column={cfg.text_column} is not a column of the {split} split; "
                f"its columns are {ds.column_names}"
            )
    raw = raw.select_columns([cfg.text_column])
    if cfg.text_column != "text":
        raw = raw.rename_column(cfg.text_column, "text")
    return _with_holdout(raw, cfg)


def _local_corpus(cfg: DataConfig) -> DatasetDict:
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return load_files(cfg, {"train": str(path)}, TEXT_FORMATS)
    if not path.is_dir():
        raise ConfigError(f"data.path={cfg.path} is neither a file nor a folder")
    from_files = tuple(split for split in SPLITS if split not in cfg.holdout)
    return load_files(cfg, split_files(cfg, path, from_files, TEXT_FORMATS), TEXT_FORMATS)


def _with_holdout(raw: DatasetDict, cfg: DataConfig) -> DatasetDict:
    """The splits of `data.holdout` cut from the training text's last rows (test last, validation
    before it), the training split keeping the rows before them."""
    missing = [split for split in SPLITS if split not in raw and split not in cfg.holdout]
    if missing:
        raise ConfigError(
            f"data.path={cfg.path} gives no {missing} split; add its file or carve it from the training "
            f"text, e.g. data.holdout.{missing[0]}=0.1"
        )
    train = raw["train"]
    end = len(train)
    for split in ("test", "validation"):
        if split in cfg.holdout:
            rows = math.ceil(cfg.holdout[split] * len(train))
            raw[split] = train.select(range(end - rows, end))
            end -= rows
    raw["train"] = train.select(range(end))
    return DatasetDict({split: raw[split] for split in SPLITS})


def words(texts: Iterable[str]) -> list[str]:
    """The whitespace-separated words of `texts`: what word-level perplexity is normalised by."""
    return [word for text in texts for word in text.split()]


def unigram_word_perplexity(train_words: list[str], test_words: list[str]) -> float:
    """The add-one unigram model of the training words, scored on the test words: the baseline
    every language-modelling result is recorded beside.

    p(w) = (count(w) + 1) / (N + V), with N training words and V their distinct words plus one
    for every word unseen in training (count 0).
    """
    counts = Counter(train_words)
    total, vocabulary = len(train_words), len(counts) + 1
    log_likelihood = sum(math.log((counts.get(w, 0) + 1) / (total + vocabulary)) for w in test_words)
    return math.exp(-log_likelihood / len(test_words))
