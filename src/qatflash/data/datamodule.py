"""The LightningDataModule for text classification.

Tokenization runs through `Dataset.map` with an explicit fingerprint built from the raw data's
fingerprint, the tokenizer's vocabulary and `max_length`, so the cached result is found again by
every later run and sweep point that shares them (datasets cannot hash tokenizers reliably itself).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import lightning as L
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader, RandomSampler, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from qatflash.config import DataConfig
from qatflash.data.sources import load_splits

# What every model receives, whatever its tokenizer also returns: single-sentence classification
# needs no token type ids (models default them to zeros), and a fixed set of inputs is what
# torch.export traces and the latency benchmark feeds.
MODEL_INPUTS = ("input_ids", "attention_mask")

# Part of the cache fingerprint: bump when the tokenize step's output columns change.
_TOKENIZE_FORMAT = "ids+mask+length/2"

TokenizerFactory = Callable[[Iterable[str]], PreTrainedTokenizerBase]


class EpochSeededSampler(Sampler[int]):
    """Shuffles epoch k with a generator seeded by (seed, k), which Lightning sets through `set_epoch`.

    A single generator drawn from epoch after epoch would restart at the first permutation when a
    run resumes from a checkpoint; seeding by epoch gives the resumed run the same batches.
    """

    def __init__(self, make: Callable[..., Sampler[int]], seed: int) -> None:
        self.make, self.seed, self.epoch = make, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sampler(self) -> Sampler[int]:
        return self.make(generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))

    def __iter__(self) -> Iterator[int]:
        return iter(self._sampler())

    def __len__(self) -> int:
        return len(self._sampler())


class TokenizedData(L.LightningDataModule):
    """What every task's data module holds: its config and seed, the tokenizer it makes from the
    training texts (trained, or the model's own) and the tokenized splits, both set by `setup()`."""

    def __init__(self, cfg: DataConfig, tokenizer_factory: TokenizerFactory, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self._tokenizer_factory = tokenizer_factory
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: DatasetDict | None = None

    def vocabulary_digest(self) -> str:
        """The tokenizer's whole definition, hashed: part of every cache fingerprint built on its
        output (datasets cannot hash tokenizers reliably itself)."""
        assert self.tokenizer is not None, "setup() makes the tokenizer first"
        return hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


class TextClassificationData(TokenizedData):
    def __init__(self, cfg: DataConfig, tokenizer_factory: TokenizerFactory, seed: int = 0) -> None:
        super().__init__(cfg, tokenizer_factory, seed)
        self._raw: DatasetDict | None = None
        self.label_names: list[str] = []
        self.sequence_lengths: list[int] = []
        self._train_lengths: list[int] = []

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def index(self) -> DatasetDict:
        """Load and subset the raw splits once (no tokenizer yet): enough to count the training examples."""
        if self._raw is None:
            raw = load_splits(self.cfg, self.seed)
            self.label_names = raw["train"].features["label"].names
            for split, limit in (
                ("train", self.cfg.train_subset),
                ("validation", self.cfg.validation_subset),
            ):
                if limit is not None and limit < len(raw[split]):
                    raw[split] = raw[split].shuffle(seed=self.seed).select(range(limit))
            self._raw = raw
        return self._raw

    @property
    def train_size(self) -> int:
        return len(self.index()["train"])

    def setup(self, stage: str | None = None) -> None:
        """Index, then tokenize once; Lightning calls this again for every stage."""
        if self.splits is not None:
            return
        raw = self.index()
        self.tokenizer = self._tokenizer_factory(raw["train"]["text"])
        tokenized = DatasetDict({split: self._tokenize(ds) for split, ds in raw.items()})
        self.sequence_lengths = sorted({n for ds in tokenized.values() for n in ds.unique("length")})
        self._train_lengths = tokenized["train"]["length"]
        self.splits = tokenized.remove_columns("length")

    @property
    def pads_batches(self) -> bool:
        """Whether any batch can hold padding (sequences of unequal length, or fixed-length evaluation)."""
        lengths = self.sequence_lengths
        return len(lengths) > 1 or (
            self.cfg.eval_padding == "max_length" and lengths[0] < self.cfg.max_length
        )

    def _tokenize(self, ds: Dataset) -> Dataset:
        tokenizer, max_length = self.tokenizer, self.cfg.max_length
        vocab = self.vocabulary_digest()
        fingerprint = hashlib.sha256(
            f"{ds._fingerprint}-{vocab}-{max_length}-{_TOKENIZE_FORMAT}".encode()
        ).hexdigest()[:32]
        return (
            ds.map(
                lambda batch: tokenizer(
                    batch["text"], truncation=True, max_length=max_length, return_length=True
                ),
                batched=True,
                remove_columns=["text"],
                new_fingerprint=fingerprint,
                desc="tokenize",
            )
            .select_columns([*MODEL_INPUTS, "length", "label"])
            .rename_column("label", "labels")
        )

    def _loader(
        self, split: str, batch_size: int, collate: DataCollatorWithPadding, sampler: Sampler | None = None
    ) -> DataLoader:
        assert self.splits is not None, "call setup() first"
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def _eval_collate(self) -> DataCollatorWithPadding:
        if self.cfg.eval_padding == "max_length":
            return DataCollatorWithPadding(
                self.tokenizer, padding="max_length", max_length=self.cfg.max_length
            )
        return DataCollatorWithPadding(self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        # Pad to the longest sequence of each batch: SST-2 sentences average 13 tokens. Grouping
        # batches by length (random megabatches sorted by length) pads less still.
        if self.cfg.group_by_length:
            make = partial(LengthGroupedSampler, self.cfg.batch_size, lengths=self._train_lengths)
        else:
            make = partial(RandomSampler, self.splits["train"])
        sampler = EpochSeededSampler(make, self.seed)
        return self._loader("train", self.cfg.batch_size, DataCollatorWithPadding(self.tokenizer), sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.cfg.eval_batch_size, self._eval_collate())

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.cfg.eval_batch_size, self._eval_collate())
